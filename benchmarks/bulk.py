"""The bulk peers: each engine's own way to map a function over many items.

What a user of many small calls would reach for instead of a runner, each with its
default batching: ``joblib.Parallel(n_jobs=2)`` over loky beside the Parallel runner,
``dask.bag.from_sequence(...).map(f)`` on the Dask runner's cluster, and
``ray.util.multiprocessing.Pool(2).map`` on the Ray runner's instance. They run the
same ``run_fn`` as the runners and return its States, so results are checked alike.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
from functools import partial
from typing import Any, Optional

from benchmarks.clusters import SharedCluster
from benchmarks.engines import BatchTimeout, EngineSettings, SyncEngine
from benchmarks.families import Family, RunnerUnavailable
from benchmarks.workloads import call_ignoring_item

__all__ = ["bulk_engine", "JoblibMap", "DaskBagMap", "RayPoolMap"]


def bulk_engine(family: Family, settings: EngineSettings, shared: Optional[SharedCluster]) -> SyncEngine:
    """The bulk peer of ``family``; :class:`RunnerUnavailable` says why not."""
    if family.key == "parallel":
        if importlib.util.find_spec("joblib") is None:
            raise RunnerUnavailable("joblib is not installed (pip install 'taskrunners[bench]')")
        return JoblibMap(settings.workers)
    if family.key not in ("dask", "ray"):
        raise RunnerUnavailable(f"{family.title} has no bulk peer")
    missing = family.missing_requirement()
    if missing:
        raise RunnerUnavailable(missing)
    if shared is None or shared.address is None:
        raise RunnerUnavailable(f"the {family.bulk} peer needs the runner's shared cluster")
    if family.key == "dask":
        if importlib.util.find_spec("dask.bag") is None:
            raise RunnerUnavailable("dask.bag is not importable (pip install 'dask[bag]')")
        return DaskBagMap(shared.address)
    return RayPoolMap(settings.workers)


class JoblibMap(SyncEngine):
    """``joblib.Parallel(n_jobs=workers)(delayed(fn)(**kwargs) ...)``, batch_size="auto".

    A new ``Parallel`` per batch, as joblib is commonly called; its loky workers are
    joblib's reusable executor, kept warm between batches and stopped on close.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.name = f"joblib.Parallel(n_jobs={workers})"

    def run_batch(self, fn, kwargs, calls, timeout):
        from joblib import Parallel, delayed

        call = delayed(partial(call_ignoring_item, fn, kwargs))
        try:
            return Parallel(n_jobs=self.workers, timeout=timeout)(call(i) for i in range(calls))
        except (concurrent.futures.TimeoutError, multiprocessing.TimeoutError):
            raise BatchTimeout.after(calls, timeout) from None

    def close(self):
        # joblib keeps its workers for later calls (for 300 s); none may outlive the session.
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor(max_workers=self.workers).shutdown(wait=True)

    def abort(self, exc):
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor(max_workers=self.workers).shutdown(wait=False, kill_workers=True)


class DaskBagMap(SyncEngine):
    """``dask.bag.from_sequence(range(calls)).map(f)`` computed on the shared cluster.

    Dask's default partitioning. Each batch maps over its own range of numbers: a bag
    is keyed by its contents, and two batches with the same keys could share results.
    """

    name = "dask.bag map"

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None
        self._next = 0

    def open(self):
        from distributed import Client

        self._client = Client(self.address, set_as_default=False)

    def run_batch(self, fn, kwargs, calls, timeout):
        import dask.bag
        from distributed import TimeoutError as DaskTimeoutError

        first, self._next = self._next, self._next + calls
        bag = dask.bag.from_sequence(range(first, first + calls))
        future = self._client.compute(bag.map(partial(call_ignoring_item, fn, kwargs)))
        try:
            return future.result(timeout=timeout)
        except (DaskTimeoutError, TimeoutError):
            future.cancel()
            raise BatchTimeout.after(calls, timeout) from None

    def close(self):
        client, self._client = self._client, None
        if client is not None:
            client.close()


class RayPoolMap(SyncEngine):
    """``ray.util.multiprocessing.Pool(workers).map``, its default chunk size.

    The pool's actors hold no CPU while they wait (Ray's ``num_cpus=0``), so they
    share the Ray instance with the runner's tasks without starving them.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.name = f"ray Pool({workers}).map"
        self._pool: Any = None

    def open(self):
        from ray.util.multiprocessing import Pool

        self._pool = Pool(processes=self.workers)

    def run_batch(self, fn, kwargs, calls, timeout):
        result = self._pool.map_async(partial(call_ignoring_item, fn, kwargs), range(calls))
        try:
            return result.get(timeout=timeout)
        except (multiprocessing.TimeoutError, TimeoutError):
            raise BatchTimeout.after(calls, timeout) from None

    def close(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            pool.join()

    def abort(self, exc):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
