"""The engines a batch of calls runs on: the raw libraries, and the runners over them.

Each engine opens once per session, runs batches (``run_batch``: submit every call,
then wait for every result), and closes. Synchronous engines are driven from plain
code; asynchronous ones from inside ``anyio.run``.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import inspect
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import anyio

from benchmarks.workloads import Workload, run_coroutine
from taskrunners import TaskRun
from taskrunners.states import State

__all__ = ["BatchTimeout", "Family", "FAMILIES", "EngineSettings", "SharedCluster"]


class BatchTimeout(RuntimeError):
    """A batch did not finish within the harness's time limit."""


def _timeout_error(calls: int, timeout: float) -> BatchTimeout:
    return BatchTimeout(f"{calls} calls did not finish within {timeout:g} seconds.")


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
    """An engine driven from inside ``anyio.run``."""

    is_async = True
    accepts_plain = True
    accepts_async = True
    name = ""

    async def open(self) -> None:
        pass

    async def run_batch(
        self, fn: Callable[..., Any], kwargs: Dict[str, Any], calls: int, timeout: float
    ) -> List[Any]:
        raise NotImplementedError

    def check(self, results: List[Any]) -> Optional[str]:
        return check_states(results)

    async def close(self) -> None:
        pass

    async def abort(self, exc: BaseException) -> None:
        await self.close()


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
        raise _timeout_error(calls, timeout) from None


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
            raise _timeout_error(calls, timeout) from None

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
                raise _timeout_error(calls, timeout)
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
        self._block: Any = None

    async def open(self):
        block = self.runner.start()
        await block.__aenter__()
        self._block = block

    async def run_batch(self, fn, kwargs, calls, timeout):
        runner = self.runner
        futures = [await runner.submit(TaskRun(), fn, kwargs) for _ in range(calls)]
        deadline = time.monotonic() + timeout
        states = []
        for future in futures:
            state = await runner.wait(future, max(0.0, deadline - time.monotonic()))
            if state is None:
                raise _timeout_error(calls, timeout)
            states.append(state)
        return states

    async def close(self):
        block, self._block = self._block, None
        await block.__aexit__(None, None, None)

    async def abort(self, exc):
        block, self._block = self._block, None
        if block is not None:
            await block.__aexit__(type(exc), exc, exc.__traceback__)


# -- families: a runner with its raw engine ---------------------------------------------------


class RunnerUnavailable(Exception):
    """A runner (or its raw engine) cannot run here; the message says why."""


class SharedCluster:
    """One Dask cluster or Ray instance that every session of a runner joins (``--quick``).

    Saves starting a cluster per mode; the runners' start-up then measures joining.
    ``address`` is set while it is open: the scheduler address, or "ray".
    """

    def __init__(self, family_key: str, settings: EngineSettings) -> None:
        self.family_key = family_key
        self.settings = settings
        self.address: Optional[str] = None
        self._cluster: Any = None

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
        return f"--quick: joined one {what} shared by all modes"


@dataclass(frozen=True)
class Family:
    """One runner, the raw engine it is measured against, and how to size its batches.

    :param raw_plain: the raw engine (for every workload, unless ``raw_async`` is given)
    :param raw_async: the raw engine for coroutine workloads, when it is another one
    :param key: the name on the command line (``--runners``)
    :param title: the runner's name in tables
    :param runner_class: the class name in :mod:`taskrunners.sync` and :mod:`taskrunners`
    :param requires: a module the runner needs, and the extra that installs it
    :param seconds_per_dispatch: a rough cost of one call on the engine, for sizing batches
    :param bounded: whether at most ``workers`` calls run at once (else: one per call)
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

    def concurrent_calls(self, workload: Workload, workers: int) -> float:
        """How many calls of ``workload`` can make progress at once."""
        if self.in_process:
            if not self.bounded:
                return 1.0 if workload.holds_gil else math.inf
            return 1.0
        return float(workers)

    def raw_engine(
        self, settings: EngineSettings, is_async: bool, shared: Optional[SharedCluster] = None
    ) -> Any:
        if shared is not None:
            if self.key == "dask":
                return DaskClient(settings.dask_cluster_kwargs(), address=shared.address)
            return RayRemote(settings.ray_init_kwargs(), joined=True)
        make = self.raw_async if is_async and self.raw_async else self.raw_plain
        return make(settings)

    def twin(self, settings: EngineSettings, shared: Optional[SharedCluster] = None) -> Twin:
        """The blocking twin, constructed; :class:`RunnerUnavailable` says why not."""
        import taskrunners.sync

        cls = getattr(taskrunners.sync, self.runner_class)
        return Twin(self._construct(cls, settings, shared))

    def facade(self, settings: EngineSettings, shared: Optional[SharedCluster] = None) -> Facade:
        """The async facade, constructed; :class:`RunnerUnavailable` says why not."""
        import taskrunners

        cls = getattr(taskrunners, self.runner_class)
        return Facade(self._construct(cls, settings, shared))

    def _construct(
        self, cls: type, settings: EngineSettings, shared: Optional[SharedCluster] = None
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
            peer="ProcessPoolTaskRunner", peer_seconds_per_dispatch=1.0,
        ),
        Family(
            "dask", "Dask", "DaskTaskRunner",
            raw_plain=lambda s: DaskClient(s.dask_cluster_kwargs()),
            runner_kwargs=lambda s: {"cluster_kwargs": s.dask_cluster_kwargs()},
            requires=("distributed", "dask"), seconds_per_dispatch=0.003, shares_cluster=True,
            peer="prefect_dask.DaskTaskRunner", peer_seconds_per_dispatch=0.2,
        ),
        Family(
            "ray", "Ray", "RayTaskRunner",
            raw_plain=lambda s: RayRemote(s.ray_init_kwargs()),
            runner_kwargs=lambda s: {"init_kwargs": s.ray_init_kwargs()},
            requires=("ray", "ray"), seconds_per_dispatch=0.001, shares_cluster=True,
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
