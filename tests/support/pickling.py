"""The test payloads travel to workers by value, so no worker needs to import the tests."""

from __future__ import annotations

import importlib
from typing import Any

# The modules whose functions run in worker processes, and the helpers they call.
PAYLOAD_MODULES = (
    "tests.support.payloads",
    "tests.support.parallel_payloads",
    "tests.support.dask_payloads",
    "tests.support.ray_payloads",
    "tests.support.large_payloads",
    "tests.support.stuck",
    "tests.support.waiting",
)


def register_payloads(pickler: Any) -> None:
    """Make ``pickler`` (cloudpickle, or Ray's own copy of it) send the payload modules by value."""
    for name in PAYLOAD_MODULES:
        pickler.register_pickle_by_value(importlib.import_module(name))
