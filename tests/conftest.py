"""Fixtures for the standard suite: every runner kind, in every mode."""

from __future__ import annotations

import cloudpickle
import pytest

from tests.support.driver import driving
from tests.support.kinds import KIND_MODULES, kind_params, on_twin_only_kind_in_facade
from tests.support.pickling import register_payloads

register_payloads(cloudpickle)

# Each kinds module may define the fixtures its kinds need (a cluster address, ...).
pytest_plugins = KIND_MODULES

MODES = ["sync", "asyncio", "trio"]


def pytest_collection_modifyitems(config, items):
    """Leave out the facade modes of the ``twin_only`` kinds."""
    deselected = [item for item in items if on_twin_only_kind_in_facade(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not on_twin_only_kind_in_facade(item)]


@pytest.fixture(params=kind_params())
def kind(request):
    """Each runner kind."""
    return request.param


@pytest.fixture(params=MODES)
def mode(request):
    """The blocking twin, or the facade on asyncio or trio."""
    return request.param


@pytest.fixture
def driver(kind, mode, request):
    """An unstarted runner of ``kind``, driven in ``mode``."""
    with driving(kind.make(request, blocking=mode == "sync"), mode) as driver:
        yield driver


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
