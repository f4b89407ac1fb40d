"""The engines a batch of calls runs on: the raw libraries, and the runners over them.

Each engine opens once per session, runs batches (``run_batch``: submit every call,
then wait for every result), and closes. Every engine of one runner is open at the
same time, so their batches can take turns: the harness drives them all from plain
code in the main thread, and an asynchronous engine (an async facade, an anyio task
group) through :class:`OnEventLoop`, which keeps its event loop in a thread of its own.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import inspect
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Dict, List, Optional, Union

import anyio
import anyio.from_thread

from benchmarks.workloads import Workload, run_coroutine
from taskrunners import TaskRun
from taskrunners.states import State

__all__ = [
    "BatchTimeout", "Family", "FAMILIES", "EngineSettings", "SharedCluster", "SyncEngine",
    "AsyncEngine", "OnEventLoop", "RunnerUnavailable", "has_batch_size",
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


# -- raw engines ------------------------------------------------------------------------


class PlainLoop(SyncEngine):
    """Calls the function in a ``for`` loop: the floor for the Sequential runner."""

    name = "loop"
    accepts_async = False

    def run_batch(self, fn, kwargs, calls, timeout):
        return [fn(**kwargs) for _ in range(calls)]


class AwaitLoop(AsyncEngine):
    """Awaits the coroutine function in a ``for`` loop: Sequential's floor for async calls."""

    name = "await loop"
    accepts_plain = False

    async def run_batch(self, fn, kwargs, calls, timeout):
        with anyio.fail_after(timeout):
            return [await fn(**kwargs) for _ in range(calls)]


class ThreadPool(SyncEngine):
    """``concurrent.futures.ThreadPoolExecutor``: Concurrent's floor for plain calls.

    Sized as ConcurrentTaskRunner sizes its pool by default: a new thread whenever
    every thread is busy, so sleeping calls never wait for each other.
    """

    name = "ThreadPoolExecutor"
    accepts_async = False

    def __init__(self) -> None:
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def open(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2**31 - 1, thread_name_prefix="benchmark-raw"
        )

    def run_batch(self, fn, kwargs, calls, timeout):
        pool = self._pool
        futures = [pool.submit(fn, **kwargs) for _ in range(calls)]
        return _results(futures, calls, timeout)

    def close(self):
        self._pool.shutdown(wait=True)

    def abort(self, exc):
        self._pool.shutdown(wait=False, cancel_futures=True)


class TaskGroup(AsyncEngine):
    """An anyio task group, one task per call: Concurrent's floor for async calls."""

    name = "anyio task group"
    accepts_plain = False

    async def run_batch(self, fn, kwargs, calls, timeout):
        results: List[Any] = [None] * calls

        async def call(index: int) -> None:
            results[index] = await fn(**kwargs)

        with anyio.fail_after(timeout):
            async with anyio.create_task_group() as task_group:
                for index in range(calls):
                    task_group.start_soon(call, index)
        return results


def _results(futures: List[concurrent.futures.Future], calls: int, timeout: float) -> List[Any]:
    deadline = time.monotonic() + timeout
    try:
        return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]
    except concurrent.futures.TimeoutError:
        raise BatchTimeout.after(calls, timeout) from None


class LokyPool(SyncEngine):
    """loky's ``ProcessPoolExecutor``: the floor for the Parallel runner."""

    name = "loky ProcessPoolExecutor"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def open(self):
        import loky

        self._pool = loky.ProcessPoolExecutor(max_workers=self.workers)

    def run_batch(self, fn, kwargs, calls, timeout):
        pool = self._pool
        if _is_coroutine_function(fn):
            futures = [pool.submit(run_coroutine, fn, kwargs) for _ in range(calls)]
        else:
            futures = [pool.submit(fn, **kwargs) for _ in range(calls)]
        return _results(futures, calls, timeout)

    def close(self):
        self._pool.shutdown(wait=True)

    def abort(self, exc):
        self._pool.shutdown(wait=False, kill_workers=True)


class DaskClient(SyncEngine):
    """``Client.submit`` + ``Client.gather`` on a processes LocalCluster: Dask's floor."""

    name = "Dask Client.submit"

    def __init__(self, cluster_kwargs: Dict[str, Any], address: Optional[str] = None) -> None:
        self.cluster_kwargs = cluster_kwargs
        self.address = address
        self._cluster: Any = None
        self._client: Any = None

    def open(self):
        from distributed import Client, LocalCluster

        if self.address is None:
            self._cluster = LocalCluster(**self.cluster_kwargs)
        self._client = Client(self.address or self._cluster, set_as_default=False)

    def run_batch(self, fn, kwargs, calls, timeout):
        client = self._client
        # pure=False: identical calls must not collapse into one Dask task.
        if _is_coroutine_function(fn):
            futures = [client.submit(run_coroutine, fn, kwargs, pure=False) for _ in range(calls)]
        else:
            futures = [client.submit(fn, pure=False, **kwargs) for _ in range(calls)]
        return client.gather(futures)

    def close(self):
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


class RayRemote(SyncEngine):
    """``ray.remote(fn).remote()`` + ``ray.get`` on a local Ray instance: Ray's floor."""

    name = "Ray remote()"

    def __init__(self, init_kwargs: Dict[str, Any], joined: bool = False) -> None:
        self.init_kwargs = init_kwargs
        self.joined = joined
        self._remote: Dict[Any, Any] = {}

    def open(self):
        import ray

        if not self.joined:
            # address="local": always a fresh instance, never a cluster found on the machine.
            ray.init(address="local", **self.init_kwargs)

    def run_batch(self, fn, kwargs, calls, timeout):
        import ray

        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(
                run_coroutine if _is_coroutine_function(fn) else fn
            )
        if _is_coroutine_function(fn):
            refs = [remote.remote(fn, kwargs) for _ in range(calls)]
        else:
            refs = [remote.remote(**kwargs) for _ in range(calls)]
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise BatchTimeout.after(calls, timeout) from None

    def close(self):
        import ray

        self._remote.clear()
        if not self.joined:
            ray.shutdown()


def _is_coroutine_function(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn)


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


# -- families: a runner with the engines it is measured against ---------------------------------


class RunnerUnavailable(Exception):
    """An engine cannot run here; the message says why.

    :param status: how its cells are marked: "skipped" (a missing module, a runner not
        written yet) or "not run" (a setting the runner does not have yet)
    """

    def __init__(self, message: str, status: str = "skipped") -> None:
        super().__init__(message)
        self.status = status


def has_batch_size(runner_class: type) -> bool:
    """Whether the runner class takes a ``batch_size`` argument."""
    try:
        return "batch_size" in inspect.signature(runner_class).parameters
    except (TypeError, ValueError):
        return False


#: A batch size: 1 (one engine task per call) or "auto" (the runner decides).
BatchSize = Union[int, str]


class SharedCluster:
    """The Dask cluster or Ray instance that every engine of one runner joins.

    Its engines take turns on it, so a batch of one never competes with a cluster of
    another, and they are compared on the very same workers. The runners' start-up
    then measures joining; the cluster's own start-up is recorded apart.
    ``address`` is set while it is open: the scheduler address, or "ray".
    """

    def __init__(self, family_key: str, settings: EngineSettings) -> None:
        self.family_key = family_key
        self.settings = settings
        self.address: Optional[str] = None
        self._cluster: Any = None

    @property
    def name(self) -> str:
        if self.family_key == "dask":
            return "distributed.LocalCluster"
        return "ray.init(address='local')"

    def open(self) -> None:
        if self.family_key == "dask":
            from distributed import LocalCluster

            self._cluster = LocalCluster(**self.settings.dask_cluster_kwargs())
            self.address = self._cluster.scheduler_address
        else:
            import ray

            ray.init(address="local", **self.settings.ray_init_kwargs())
            self.address = "ray"

    def close(self) -> None:
        self.address = None
        if self.family_key == "dask":
            cluster, self._cluster = self._cluster, None
            if cluster is not None:
                cluster.close()
        else:
            import ray

            ray.shutdown()

    def note(self) -> str:
        what = "Dask cluster" if self.family_key == "dask" else "Ray instance"
        return f"joined the {what} shared by this runner's engines"


@dataclass(frozen=True)
class Family:
    """One runner, the engines it is measured against, and how to size its batches.

    :param raw_plain: the raw engine (for every workload, unless ``raw_async`` is given)
    :param raw_async: the raw engine for coroutine workloads, when it is another one
    :param key: the name on the command line (``--runners``)
    :param title: the runner's name in tables
    :param runner_class: the class name in :mod:`taskrunners.sync` and :mod:`taskrunners`
    :param requires: a module the runner needs, and the extra that installs it
    :param seconds_per_dispatch: a rough cost of one call on the engine, for sizing batches
    :param bounded: whether at most ``workers`` calls run at once (else: one per call)
    :param batching: whether the runner is to batch calls (``batch_size``): its
        ``batch_size="auto"`` and its engine's bulk map are measured too
    :param bulk: the engine's own bulk map, and a rough cost of one call on it
    :param peer: Prefect's matching runner, and a rough cost of one call on it
    """

    key: str
    title: str
    runner_class: str
    raw_plain: Callable[[EngineSettings], SyncEngine]
    raw_async: Optional[Callable[[EngineSettings], AsyncEngine]] = None
    runner_kwargs: Callable[[EngineSettings], Dict[str, Any]] = field(default=lambda s: {})
    shares_cluster: bool = False
    requires: Optional[tuple] = None
    seconds_per_dispatch: float = 0.0
    bounded: bool = True
    in_process: bool = False
    batching: bool = False
    bulk: Optional[str] = None
    bulk_seconds_per_dispatch: float = 0.0
    peer: Optional[str] = None
    peer_seconds_per_dispatch: float = 0.0

    def missing_requirement(self) -> Optional[str]:
        """Why this runner cannot run here (a module is missing), or None."""
        if self.requires is None:
            return None
        module, extra = self.requires
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'taskrunners[{extra}]')"
        return None

    def has_mode(self, mode: str) -> bool:
        """Whether this runner is measured in ``mode`` at all."""
        if mode in ("auto", "bulk"):
            return self.batching
        if mode == "prefect":
            return self.peer is not None
        return True

    def concurrent_calls(self, workload: Workload, workers: int) -> float:
        """How many calls of ``workload`` can make progress at once."""
        if self.in_process:
            if not self.bounded:
                return 1.0 if workload.holds_gil else math.inf
            return 1.0
        return float(workers)

    def engine(
        self, mode: str, settings: EngineSettings, shared: Optional[SharedCluster],
        is_async: bool = False,
    ) -> SyncEngine:
        """The engine of ``mode``, constructed; :class:`RunnerUnavailable` says why not.

        The modes of the family's own engine and runner: "raw", "twin", "facade",
        "auto" (the peers of "bulk" and "prefect" sit above, in bulk.py and peers.py).
        The runner modes pin ``batch_size`` where the runner has it: 1 for "twin" and
        "facade" (what the raw engine is compared with), "auto" for "auto".
        """
        if mode == "raw":
            return self.raw_engine(settings, is_async, shared)
        if mode == "twin":
            return self.twin(settings, shared, batch_size=1)
        if mode == "facade":
            return OnEventLoop(self.facade(settings, shared, batch_size=1))
        if mode == "auto":
            return self.twin(settings, shared, batch_size="auto")
        raise ValueError(
            f"mode={mode!r} has no engine here; the bulk peers are in bulk.py (bulk_engine), "
            "Prefect's runners in peers.py (peer_engine)"
        )

    def raw_engine(
        self, settings: EngineSettings, is_async: bool, shared: Optional[SharedCluster] = None
    ) -> SyncEngine:
        if shared is not None:
            if self.key == "dask":
                return DaskClient(settings.dask_cluster_kwargs(), address=shared.address)
            return RayRemote(settings.ray_init_kwargs(), joined=True)
        make = self.raw_async if is_async and self.raw_async else self.raw_plain
        engine = make(settings)
        return OnEventLoop(engine) if isinstance(engine, AsyncEngine) else engine

    def twin(
        self, settings: EngineSettings, shared: Optional[SharedCluster] = None,
        batch_size: Optional[BatchSize] = None,
    ) -> Twin:
        """The blocking twin, constructed; :class:`RunnerUnavailable` says why not."""
        import taskrunners.sync

        cls = getattr(taskrunners.sync, self.runner_class)
        return Twin(self._construct(cls, settings, shared, batch_size))

    def facade(
        self, settings: EngineSettings, shared: Optional[SharedCluster] = None,
        batch_size: Optional[BatchSize] = None,
    ) -> Facade:
        """The async facade, constructed; :class:`RunnerUnavailable` says why not."""
        import taskrunners

        cls = getattr(taskrunners, self.runner_class)
        return Facade(self._construct(cls, settings, shared, batch_size))

    def _construct(
        self, cls: type, settings: EngineSettings, shared: Optional[SharedCluster] = None,
        batch_size: Optional[BatchSize] = None,
    ) -> Any:
        missing = self.missing_requirement()
        if missing:
            raise RunnerUnavailable(missing)
        if shared is None:
            kwargs = self.runner_kwargs(settings)
        elif self.key == "dask":
            kwargs = {"address": shared.address}
        else:
            kwargs = {}  # Ray is initialised in this process: the runner joins it
        if batch_size is not None and self.batching:
            if has_batch_size(cls):
                kwargs["batch_size"] = batch_size
            elif batch_size != 1:
                raise RunnerUnavailable("runner has no batch_size yet", status="not run")
            # Without the argument, today's runner sends one engine task per call: the
            # very behaviour batch_size=1 asks for.
        try:
            return cls(**kwargs)
        except NotImplementedError:
            raise RunnerUnavailable(f"{self.runner_class} is not implemented yet") from None

    def cleanup(self) -> Optional[str]:
        """Stop what a session of this family may have left running; say what it was."""
        if self.key == "ray":
            import sys

            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()
                return "Ray was still initialised after the session; the harness shut it down"
        return None


FAMILIES: Dict[str, Family] = {
    f.key: f
    for f in (
        Family(
            "sequential", "Sequential", "SequentialTaskRunner",
            raw_plain=lambda s: PlainLoop(), raw_async=lambda s: AwaitLoop(),
            in_process=True,
        ),
        Family(
            "concurrent", "Concurrent", "ConcurrentTaskRunner",
            raw_plain=lambda s: ThreadPool(), raw_async=lambda s: TaskGroup(),
            seconds_per_dispatch=0.0001, bounded=False, in_process=True,
            peer="ThreadPoolTaskRunner", peer_seconds_per_dispatch=0.01,
        ),
        Family(
            "parallel", "Parallel", "ParallelTaskRunner",
            raw_plain=lambda s: LokyPool(s.workers),
            runner_kwargs=lambda s: {"max_workers": s.workers},
            seconds_per_dispatch=0.0005,
            batching=True, bulk="joblib.Parallel", bulk_seconds_per_dispatch=0.00005,
            peer="ProcessPoolTaskRunner", peer_seconds_per_dispatch=1.0,
        ),
        Family(
            "dask", "Dask", "DaskTaskRunner",
            raw_plain=lambda s: DaskClient(s.dask_cluster_kwargs()),
            runner_kwargs=lambda s: {"cluster_kwargs": s.dask_cluster_kwargs()},
            requires=("distributed", "dask"), seconds_per_dispatch=0.003, shares_cluster=True,
            batching=True, bulk="dask.bag", bulk_seconds_per_dispatch=0.0007,
            peer="prefect_dask.DaskTaskRunner", peer_seconds_per_dispatch=0.2,
        ),
        Family(
            "ray", "Ray", "RayTaskRunner",
            raw_plain=lambda s: RayRemote(s.ray_init_kwargs()),
            runner_kwargs=lambda s: {"init_kwargs": s.ray_init_kwargs()},
            requires=("ray", "ray"), seconds_per_dispatch=0.001, shares_cluster=True,
            batching=True, bulk="ray Pool.map", bulk_seconds_per_dispatch=0.00005,
            peer="prefect_ray.RayTaskRunner", peer_seconds_per_dispatch=0.2,
        ),
    )
}


def quiet_engines() -> Dict[str, str]:
    """Settle the environment every engine starts in; returns what was set.

    Must run before dask, distributed or ray are imported. Ray is kept on the
    loopback interface (its servers otherwise listen on every interface), and Dask's
    and Ray's informational logging is silenced so the progress bar stays readable.
    """
    wanted = {
        # Ray picks 127.0.0.1 as the node address, so its servers bind to loopback only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "DASK_LOGGING__DISTRIBUTED": "error",
    }
    applied = {}
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    # A RAY_ADDRESS in the environment would make a "local" instance join a cluster.
    if os.environ.pop("RAY_ADDRESS", None) is not None:
        applied["RAY_ADDRESS"] = "(unset)"
    return applied
