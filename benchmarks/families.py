"""The runner families: a runner with the engines it is measured against.

A family names the raw engine a runner is built on and builds it, its blocking twin
and async facade, and, where the runner batches, its ``batch_size="auto"`` twin; it
names the engine's bulk map and Prefect's matching runner, which ``bulk`` and
``peers`` build.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

from benchmarks.clusters import SharedCluster
from benchmarks.engines import (
    AsyncEngine,
    EngineSettings,
    ExecutorMap,
    Facade,
    OnEventLoop,
    SyncEngine,
    Twin,
)
from benchmarks.raw_engines import (
    AwaitLoop,
    DaskClient,
    LokyPool,
    PlainLoop,
    RayRemote,
    TaskGroup,
    ThreadPool,
)
from benchmarks.workloads import Workload

__all__ = ["Family", "FAMILIES", "RunnerUnavailable", "has_batch_size", "BatchSize"]


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
        if mode in ("auto", "map", "bulk"):
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
        "facade" (what the raw engine is compared with), "auto" for "auto"; "map" is
        ``RunnerExecutor.map`` over the twin as it is by default.
        """
        if mode == "raw":
            return self.raw_engine(settings, is_async, shared)
        if mode == "twin":
            return self.twin(settings, shared, batch_size=1)
        if mode == "facade":
            return OnEventLoop(self.facade(settings, shared, batch_size=1))
        if mode == "auto":
            return self.twin(settings, shared, batch_size="auto")
        if mode == "map":
            return ExecutorMap(self.twin(settings, shared).runner)
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
