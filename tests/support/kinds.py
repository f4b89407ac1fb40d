"""The runner kinds the standard suite runs on, and how to make each one.

Each ``kinds_<backend>.py`` module beside this one defines ``KINDS``, a list of
:class:`RunnerKind`, and any fixtures its kinds need (a cluster address, ...);
``tests/conftest.py`` loads those modules as pytest plugins.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskConcurrencyType

KIND_MODULES = sorted(
    f"tests.support.{path.stem}" for path in pathlib.Path(__file__).parent.glob("kinds_*.py")
)


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
    # Run on the blocking twin only: the facade adds nothing to what this kind tests
    # (a second batch_size of a runner), so its asyncio and trio modes are left out.
    twin_only: bool = False

    def make(self, request: pytest.FixtureRequest, blocking: bool) -> Any:
        module = taskrunners.sync if blocking else taskrunners
        return getattr(module, self.class_name)(**self.kwargs(request))


@functools.lru_cache(maxsize=None)
def all_kinds() -> Tuple[RunnerKind, ...]:
    """Every kind of every ``kinds_*.py`` module."""
    return tuple(kind for name in KIND_MODULES for kind in importlib.import_module(name).KINDS)


def kind_params(kinds: Optional[Iterable[RunnerKind]] = None) -> List[Any]:
    """``kinds`` (all by default) as pytest params, with their ids and marks."""
    chosen = all_kinds() if kinds is None else kinds
    return [pytest.param(kind, id=kind.id, marks=kind.marks) for kind in chosen]


def on_twin_only_kind_in_facade(item: pytest.Item) -> bool:
    """Whether ``item`` runs a ``twin_only`` kind in a facade mode (asyncio, trio)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    kind = params.get("kind")
    if not getattr(kind, "twin_only", False):
        return False
    return params.get("mode", "sync") != "sync" or "anyio_backend" in params


def parametrize_kinds(kinds: Iterable[RunnerKind]) -> pytest.MarkDecorator:
    """Run a test that uses the ``kind`` fixture (or ``driver``) on ``kinds`` only."""
    return pytest.mark.parametrize("kind", kind_params(list(kinds)), indirect=True)
