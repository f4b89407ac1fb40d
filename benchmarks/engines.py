"""The engines a batch of calls runs on: their interface, the settings they are built
with, and the runners as engines.

Each engine opens once per session, runs batches (``run_batch``: submit every call,
then wait for every result), and closes. Every engine of one runner is open at the
same time, so their batches can take turns: the harness drives them all from plain
code in the main thread, and an asynchronous engine (an async facade, an anyio task
group) through :class:`OnEventLoop`, which keeps its event loop in a thread of its own.
The raw libraries a runner is compared with are in ``raw_engines``, the bulk maps in
``bulk``, Prefect's runners in ``peers``, and which of them each runner is measured
against in ``families``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from contextlib import asynccontextmanager
from functools import partial
from dataclasses import dataclass
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Dict, List, Optional

import anyio.from_thread

from benchmarks.workloads import call_ignoring_item
from taskrunners import TaskRun
from taskrunners.states import State

__all__ = [
    "BatchTimeout", "EngineSettings", "SyncEngine", "AsyncEngine", "OnEventLoop", "Twin", "Facade",
]


class BatchTimeout(RuntimeError):
    """A batch did not finish within the harness's time limit."""

    @classmethod
    def after(cls, calls: int, timeout: float) -> "BatchTimeout":
        """The error for ``calls`` calls still running after ``timeout`` seconds."""
        return cls(f"{calls} calls did not finish within {timeout:g} seconds.")


def check_states(results: List[Any]) -> Optional[str]:
    """None when every result is a completed State, else what went wrong with the first."""
    bad = [r for r in results if not (isinstance(r, State) and r.is_completed())]
    if not bad:
        return None
    first = bad[0]
    if isinstance(first, State):
        detail = f"{first.name}: {first.message or first.result(raise_on_failure=False)!r}"
    else:
        detail = f"got {type(first).__name__}, not a State"
    return f"{len(bad)} of {len(results)} calls did not complete ({detail})"


@dataclass(frozen=True)
class EngineSettings:
    """What every engine of one run is configured with."""

    workers: int

    def dask_cluster_kwargs(self) -> Dict[str, Any]:
        # Loopback only (the HTTP server on a free port): nothing listens on the network.
        return {
            "n_workers": self.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        }

    def ray_init_kwargs(self) -> Dict[str, Any]:
        return {
            "num_cpus": self.workers,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        }

    def as_dict(self) -> Dict[str, Any]:
        ray_kwargs = dict(self.ray_init_kwargs(), logging_level="ERROR")
        return {
            "workers": self.workers,
            "parallel": {"max_workers": self.workers},
            "dask_cluster_kwargs": self.dask_cluster_kwargs(),
            "ray_init_kwargs": ray_kwargs,
        }


# -- the engine interface -----------------------------------------------------------


class SyncEngine:
    """An engine driven from plain code."""

    is_async = False
    #: Whether the engine runs plain functions, and coroutine functions.
    accepts_plain = True
    accepts_async = True
    name = ""

    def open(self) -> None:
        pass

    def run_batch(
        self, fn: Callable[..., Any], kwargs: Dict[str, Any], calls: int, timeout: float
    ) -> List[Any]:
        raise NotImplementedError

    def check(self, results: List[Any]) -> Optional[str]:
        return check_states(results)

    def close(self) -> None:
        pass

    def abort(self, exc: BaseException) -> None:
        self.close()


class AsyncEngine:
    """An engine that runs on an event loop; :class:`OnEventLoop` drives it."""

    accepts_plain = True
    accepts_async = True
    name = ""

    def lifespan(self) -> AsyncContextManager[Any]:
        """Entered to open the engine, left to close it (with the exception, to abort)."""
        return _nothing()

    async def run_batch(
        self, fn: Callable[..., Any], kwargs: Dict[str, Any], calls: int, timeout: float
    ) -> List[Any]:
        raise NotImplementedError

    def check(self, results: List[Any]) -> Optional[str]:
        return check_states(results)


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


class OnEventLoop(SyncEngine):
    """An :class:`AsyncEngine` driven from plain code, on an event loop in its own thread.

    The loop (an anyio blocking portal) lives as long as the engine is open, and the
    engine's lifespan is entered and left in one task on it, as an async runner's
    ``start()`` block requires. A batch costs one hand-over to that thread and back.
    In-process runners watch for Ctrl-C only in the main thread, so a Sequential facade
    here runs without that watch (a counter per call).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.name = engine.name
        self.accepts_plain = engine.accepts_plain
        self.accepts_async = engine.accepts_async
        self._portal_block: Any = None
        self._portal: Any = None
        self._lifespan: Any = None
        self._batch: Optional[concurrent.futures.Future] = None

    def open(self):
        portal_block = anyio.from_thread.start_blocking_portal(name=f"benchmark {self.name}")
        portal = portal_block.__enter__()
        self._portal_block = portal_block
        lifespan = portal.wrap_async_context_manager(self.engine.lifespan())
        try:
            lifespan.__enter__()
        except BaseException:
            self._stop_portal(None)
            raise
        self._lifespan = lifespan
        self._portal = portal

    def run_batch(self, fn, kwargs, calls, timeout):
        self._batch = self._portal.start_task_soon(self.engine.run_batch, fn, kwargs, calls, timeout)
        try:
            return self._batch.result()
        finally:
            self._batch = None

    def check(self, results):
        return self.engine.check(results)

    def close(self):
        lifespan, self._lifespan = self._lifespan, None
        try:
            if lifespan is not None:
                lifespan.__exit__(None, None, None)
        finally:
            self._stop_portal(None)

    def abort(self, exc):
        # A batch interrupted in the main thread (Ctrl-C) is still running on the loop.
        if self._batch is not None:
            self._batch.cancel()
        lifespan, self._lifespan = self._lifespan, None
        try:
            if lifespan is not None:
                lifespan.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass
        finally:
            self._stop_portal(exc)

    def _stop_portal(self, exc: Optional[BaseException]) -> None:
        block, self._portal_block = self._portal_block, None
        if block is None:
            return
        if exc is None:
            block.__exit__(None, None, None)
        else:
            # Left with the exception, the portal cancels what still runs on its loop.
            try:
                block.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:
                pass


# -- the runners ------------------------------------------------------------------------


class Twin(SyncEngine):
    """A blocking twin from :mod:`taskrunners.sync`, inside its ``start()`` block."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.name = f"taskrunners.sync.{type(runner).__name__}"
        self._block: Any = None

    def open(self):
        block = self.runner.start()
        block.__enter__()
        self._block = block

    def run_batch(self, fn, kwargs, calls, timeout):
        runner = self.runner
        futures = [runner.submit(TaskRun(), fn, kwargs) for _ in range(calls)]
        deadline = time.monotonic() + timeout
        states = []
        for future in futures:
            state = runner.wait(future, max(0.0, deadline - time.monotonic()))
            if state is None:
                raise BatchTimeout.after(calls, timeout)
            states.append(state)
        return states

    def close(self):
        block, self._block = self._block, None
        block.__exit__(None, None, None)

    def abort(self, exc):
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(type(exc), exc, exc.__traceback__)


class ExecutorMap(SyncEngine):
    """``RunnerExecutor(twin).map`` over the calls: chunks sized by the executor, no
    future per call; the executor (and the twin's ``start()`` block) lives as long as
    the engine is open."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.name = f"RunnerExecutor({type(runner).__name__}).map"
        self._executor: Any = None

    def open(self):
        from taskrunners.compat.futures import RunnerExecutor

        self._executor = RunnerExecutor(self.runner)

    def run_batch(self, fn, kwargs, calls, timeout):
        results = self._executor.map(partial(call_ignoring_item, fn, kwargs), range(calls), timeout=timeout)
        try:
            return list(results)
        except concurrent.futures.TimeoutError:
            raise BatchTimeout.after(calls, timeout) from None

    def close(self):
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def abort(self, exc):
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


class Facade(AsyncEngine):
    """An async facade runner from :mod:`taskrunners`, inside its ``start()`` block."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.name = f"taskrunners.{type(runner).__name__}"

    def lifespan(self):
        return self.runner.start()

    async def run_batch(self, fn, kwargs, calls, timeout):
        runner = self.runner
        futures = [await runner.submit(TaskRun(), fn, kwargs) for _ in range(calls)]
        deadline = time.monotonic() + timeout
        states = []
        for future in futures:
            state = await runner.wait(future, max(0.0, deadline - time.monotonic()))
            if state is None:
                raise BatchTimeout.after(calls, timeout)
            states.append(state)
        return states
