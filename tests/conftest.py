"""Fixtures for the standard suite: every runner kind, in every mode."""

from __future__ import annotations

import importlib
import pathlib

import cloudpickle
import pytest
from anyio.from_thread import start_blocking_portal

from tests import payloads
from tests.driver import Driver

# Test payloads travel by value, so worker processes need not import the tests.
cloudpickle.register_pickle_by_value(payloads)

_KIND_MODULES = sorted(
    f"tests.{path.stem}" for path in pathlib.Path(__file__).parent.glob("kinds_*.py")
)
# Each kinds module may define the fixtures its kinds need.
pytest_plugins = _KIND_MODULES

ALL_KINDS = [kind for name in _KIND_MODULES for kind in importlib.import_module(name).KINDS]
MODES = ["sync", "asyncio", "trio"]


def kind_params(kinds=None):
    return [pytest.param(kind, id=kind.id, marks=kind.marks) for kind in (kinds or ALL_KINDS)]


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
    runner = kind.make(request, blocking=mode == "sync")
    if mode == "sync":
        yield Driver(runner, None, mode)
        return
    with start_blocking_portal(backend=mode) as portal:
        yield Driver(runner, portal, mode)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
