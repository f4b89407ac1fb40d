"""The runner kinds the standard suite runs on, and how to make each one.

Each ``kinds_<backend>.py`` module beside this one defines ``KINDS``, a list of
:class:`RunnerKind`, and any fixtures its kinds need (a cluster address, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskConcurrencyType


def _no_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class RunnerKind:
    """One way to configure one runner class, for the standard suite."""

    id: str
    class_name: str
    concurrency_type: TaskConcurrencyType
    # Constructor kwargs; may ask ``request`` for session fixtures (addresses, ...).
    kwargs: Callable[[pytest.FixtureRequest], Dict[str, Any]] = _no_kwargs
    # Whether calls run in this test process (so they can share Python objects).
    in_process: bool = False
    # Whether States come back from another process, pickled.
    pickles_results: bool = False
    marks: tuple = ()

    def make(self, request: pytest.FixtureRequest, blocking: bool) -> Any:
        module = taskrunners.sync if blocking else taskrunners
        return getattr(module, self.class_name)(**self.kwargs(request))
