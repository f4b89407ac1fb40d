"""The raw engines: each library driven directly, the floor a runner is compared with."""

from __future__ import annotations

import concurrent.futures
import inspect
import time
from typing import Any, Dict, List, Optional

import anyio

from benchmarks.clusters import local_cluster
from benchmarks.engines import AsyncEngine, BatchTimeout, SyncEngine
from benchmarks.workloads import run_coroutine

__all__ = [
    "PlainLoop", "AwaitLoop", "ThreadPool", "TaskGroup", "LokyPool", "DaskClient", "RayRemote",
]


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
        from distributed import Client

        if self.address is None:
            self._cluster = local_cluster(**self.cluster_kwargs)
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
