"""The plan of one run: what it measures, and one session per runner.

A session holds every engine one runner is compared with (its contenders): the raw
engine, the blocking twin and the async facade (both with ``batch_size=1``), the twin
with ``batch_size="auto"``, and the engine's bulk map (Dask's and Ray's on one shared
cluster), each with the cells of the workloads it runs. How many calls a batch makes
is decided here (:class:`Config`); how the engines take turns is in ``measure``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional

from benchmarks.bulk import bulk_engine
from benchmarks.clusters import SharedCluster
from benchmarks.engines import EngineSettings, SyncEngine
from benchmarks.families import FAMILIES, Family
from benchmarks.results import MODES, Cell, SessionRecord
from benchmarks.workloads import Workload

__all__ = ["Config", "Contender", "Session", "plan_sessions", "LONG_REPEATS"]

#: The most timed rounds of the tiny workload and of each sweep point: their batches
#: are the longest, and there are many of them.
LONG_REPEATS = 3


@dataclass(frozen=True)
class Config:
    """Everything that decides what one run measures.

    :param batch_seconds: a batch whose calls would take longer than this, by the
        nominal duration of a call and the engine's concurrency, gets fewer calls
    :param batch_timeout: a batch still running after this many seconds fails
    :param spin_iterations: iterations of ``spin`` that take ``workloads.CPU_SECONDS``
    """

    workloads: tuple
    families: tuple
    repeats: int
    quick: bool
    batch_seconds: float
    batch_timeout: float
    warmup_calls: int
    spin_iterations: int
    spin_seconds: float
    engine_settings: EngineSettings
    peers: bool = False

    def repeats_for(self, workload: Workload) -> int:
        """Timed rounds of ``workload``: ``repeats``, at most LONG_REPEATS beyond the classics."""
        if workload.kind == "classic":
            return self.repeats
        return min(self.repeats, LONG_REPEATS)

    def calls(self, workload: Workload, family: Family, mode: str = "raw") -> int:
        """How many calls a batch of ``workload`` makes on ``family``'s engine of ``mode``.

        The workload's default, unless a batch would then take longer than
        ``batch_seconds``; then the largest round number of calls that fits, and at
        least two calls per worker. Engines that send one task per call (raw, twin,
        facade) always get the same count, and so do the batching ones (auto, bulk),
        which may get more; Prefect's runners, much slower per call, may get fewer.
        The tiny workload makes the same number of calls everywhere.
        """
        default = workload.quick_calls if self.quick else workload.calls
        if workload.fixed_calls:
            return default
        per_call = self._seconds_per_call(workload, family, mode)
        if default * per_call <= self.batch_seconds:
            return default
        at_once = family.concurrent_calls(workload, self.engine_settings.workers)
        floor = 2 * int(at_once) if math.isfinite(at_once) else 2
        return min(default, max(floor, _round_down(self.batch_seconds / per_call)))

    def warmup(self, workload: Workload, family: Family, mode: str, calls: int) -> int:
        """Calls in the untimed warm-up batch: the whole batch when it is cheap.

        A warm-up batch the size of the timed ones leaves pools grown to the size the
        timed batches need (threads, Ray workers), as in a long-running program, and
        lets a batching engine settle its batch size. Else as many calls as fit in a
        quarter of ``batch_seconds``, and at least ``warmup_calls``.
        """
        per_call = self._seconds_per_call(workload, family, mode)
        quarter = self.batch_seconds / 4
        if calls * per_call <= quarter:
            return calls
        return min(calls, max(self.warmup_calls, _round_down(quarter / per_call)))

    def _seconds_per_call(self, workload: Workload, family: Family, mode: str) -> float:
        at_once = family.concurrent_calls(workload, self.engine_settings.workers)
        dispatch = family.seconds_per_dispatch
        if mode == "prefect":
            dispatch = max(dispatch, family.peer_seconds_per_dispatch)
        elif mode in ("auto", "map", "bulk"):
            dispatch = family.bulk_seconds_per_dispatch
        return max(dispatch, workload.seconds_per_call / at_once)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "workloads": list(self.workloads),
            "runners": list(self.families),
            "repeats": self.repeats,
            "long_repeats": min(self.repeats, LONG_REPEATS),
            "quick": self.quick,
            "batch_seconds": self.batch_seconds,
            "batch_timeout": self.batch_timeout,
            "warmup_calls": self.warmup_calls,
            "cpu_spin_iterations": self.spin_iterations,
            "cpu_spin_seconds": self.spin_seconds,
            "engines": self.engine_settings.as_dict(),
            "peers": self.peers,
            "interleaved": True,
        }


def _round_down(value: float) -> int:
    """The largest number of the form d * 10**k (d a digit) not above ``value``."""
    if value < 1:
        return 1
    magnitude = 10 ** int(math.log10(value))
    return int(value // magnitude) * magnitude


@dataclass
class Contender:
    """One engine of a session, and its cells, by workload name."""

    mode: str
    make_engine: Callable[[], SyncEngine]
    cells: Dict[str, Cell]
    record: SessionRecord
    engine: Optional[SyncEngine] = None

    def give_up(self, status: str, note: str) -> None:
        """Mark the record, if unfinished, and every cell not yet finished."""
        if self.record.status == "pending":
            self.record.status = status
            self.record.note = note
        for cell in self.cells.values():
            if cell.status == "pending":
                cell.status = status
                cell.note = note


@dataclass
class Session:
    """The engines of one runner, opened together, taking turns on each workload."""

    index: int
    family: Family
    contenders: List[Contender]
    workloads: List[Workload]
    config: Config
    shared: Optional[SharedCluster] = None
    cluster_record: Optional[SessionRecord] = None

    @property
    def is_prefect(self) -> bool:
        return any(c.mode == "prefect" for c in self.contenders)

    @property
    def cells(self) -> List[Cell]:
        return [cell for c in self.contenders for cell in c.cells.values()]

    @property
    def records(self) -> List[SessionRecord]:
        records = [self.cluster_record] if self.cluster_record is not None else []
        return records + [c.record for c in self.contenders]

    @property
    def units(self) -> int:
        """Progress units: opening and closing each engine (and cluster), and each batch."""
        units = 2 * len(self.records)
        for workload in self.workloads:
            batches = 1 + self.config.repeats_for(workload)
            units += batches * sum(workload.name in c.cells for c in self.contenders)
        return units

    def give_up(self, status: str, note: str) -> None:
        """Mark every record and cell not yet finished with ``status``."""
        if self.cluster_record is not None and self.cluster_record.status == "pending":
            self.cluster_record.status = status
            self.cluster_record.note = note
        for contender in self.contenders:
            contender.give_up(status, note)


def plan_sessions(config: Config) -> List[Session]:
    """The sessions of one run, in the order they run: one per runner, then Prefect's.

    A runner's contenders, in this order: its raw engine (split into a plain and an
    async engine where the raw floor differs, e.g. a thread pool and an anyio task
    group), the blocking twin, the async facade, ``batch_size="auto"``, the bulk
    peer; each only for the workloads measured in its mode.
    """
    from benchmarks.workloads import WORKLOADS

    settings = config.engine_settings
    workloads = [WORKLOADS[name] for name in config.workloads]
    sessions: List[Session] = []
    prefect: List[Family] = []
    for family in (FAMILIES[key] for key in config.families):
        index = len(sessions)
        shared = SharedCluster(family.key, settings) if family.shares_cluster else None
        contenders: List[Contender] = []
        for mode in MODES:
            chosen = [w for w in workloads if mode in w.modes]
            if mode == "prefect" or not family.has_mode(mode) or not chosen:
                continue
            if mode == "raw" and family.raw_async is not None:
                for is_async in (False, True):
                    part = [w for w in chosen if w.is_async == is_async]
                    if part:
                        make = partial(family.engine, mode, settings, shared, is_async)
                        contenders.append(_contender(config, index, family, mode, make, part))
            else:
                if mode == "bulk":
                    make = partial(bulk_engine, family, settings, shared)
                else:
                    make = partial(family.engine, mode, settings, shared)
                contenders.append(_contender(config, index, family, mode, make, chosen))
        if not contenders:
            continue
        cluster_record = None
        if shared is not None:
            cluster_record = SessionRecord(
                family.key, "cluster", engine=shared.name, session=index,
                workloads=[w.name for w in workloads if any(w.name in c.cells for c in contenders)],
            )
        sessions.append(
            Session(index, family, contenders, workloads, config, shared, cluster_record)
        )
        if config.peers and family.peer and any("prefect" in w.modes for w in workloads):
            prefect.append(family)
    for family in prefect:
        from benchmarks.peers import peer_engine

        index = len(sessions)
        chosen = [w for w in workloads if "prefect" in w.modes]
        make = partial(peer_engine, family, settings)
        contender = _contender(config, index, family, "prefect", make, chosen)
        sessions.append(Session(index, family, [contender], chosen, config))
    return sessions


def _contender(
    config: Config, session: int, family: Family, mode: str, make: Callable[[], SyncEngine],
    workloads: List[Workload],
) -> Contender:
    batch_size = {"twin": "1", "facade": "1", "auto": "auto"}.get(mode) if family.batching else None
    cells = {
        w.name: Cell(w.name, family.key, mode, calls=config.calls(w, family, mode),
                     batch_size=batch_size, session=session)
        for w in workloads
    }
    record = SessionRecord(family.key, mode, workloads=[w.name for w in workloads], session=session)
    return Contender(mode, make, cells, record)
