"""The measurement: one session per runner, in which all its engines take turns.

A session opens every engine one runner is compared with, and keeps them all open:
the raw engine, the blocking twin and the async facade (both with ``batch_size=1``),
the twin with ``batch_size="auto"``, and the engine's bulk map (Dask's and Ray's on
one shared cluster). Each opening is timed (start-up, and start-to-first-result). For
each workload, every engine then runs one untimed warm-up batch, and ``repeats``
rounds of one timed batch each, the order turning by one engine every round (A B C,
B C A, C A B, ...). Load from other processes, which comes and goes over seconds,
thus falls on every engine alike, and ratios between engines are taken round by
round. At the end every engine is closed (timed: shut-down).

A batch is timed from the first submission to the last result; start-up is never
inside it. A cell (workload x runner x mode) reports the median of its timed batches.
Prefect's runners, when measured, come last, each in a session of its own run inside
a Prefect flow: importing Prefect reconfigures logging for the whole process.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional

from benchmarks.bulk import bulk_engine
from benchmarks.engines import (
    FAMILIES,
    EngineSettings,
    Family,
    RunnerUnavailable,
    SharedCluster,
    SyncEngine,
)
from benchmarks.workloads import FIRST_CALL, Workload

__all__ = [
    "Config", "Cell", "SessionRecord", "Contender", "Session", "plan_sessions", "run_sessions",
    "MODES", "LONG_REPEATS",
]

#: Every mode, in the order columns are shown (see ``workloads.MODES_OF_KIND``).
MODES = ("raw", "twin", "facade", "auto", "bulk", "prefect")

#: The most timed rounds of the tiny workload and of each sweep point: their batches
#: are the longest, and there are many of them.
LONG_REPEATS = 3

clock = time.perf_counter


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
        elif mode in ("auto", "bulk"):
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
class Cell:
    """One workload on one runner in one mode: the timed batches and their median.

    :param session: the session the cell ran in; cells of one session took turns,
        and their ``seconds`` line up round by round
    :param started: when each timed batch began, in seconds since the run started
    :param batch_size: the runner's ``batch_size`` ("1" or "auto"); None for the others
    """

    workload: str
    family: str
    mode: str
    engine: str = ""
    calls: int = 0
    status: str = "pending"  # ok, failed, skipped, not run
    note: str = ""
    batch_size: Optional[str] = None
    session: int = -1
    warmup_calls: int = 0
    warmup_seconds: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    started: List[float] = field(default_factory=list)

    @property
    def median_seconds(self) -> Optional[float]:
        if self.status != "ok" or not self.seconds:
            return None
        return statistics.median(self.seconds)

    @property
    def calls_per_second(self) -> Optional[float]:
        median = self.median_seconds
        if not median:
            return None
        return self.calls / median

    def as_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["median_seconds"] = self.median_seconds
        data["calls_per_second"] = self.calls_per_second
        return data


@dataclass
class SessionRecord:
    """How one engine (or a shared cluster, mode "cluster") started and stopped."""

    family: str
    mode: str
    engine: str = ""
    workloads: List[str] = field(default_factory=list)
    status: str = "pending"  # ok, failed, skipped, not run
    note: str = ""
    startup_seconds: Optional[float] = None
    first_result_seconds: Optional[float] = None
    shutdown_seconds: Optional[float] = None
    session: int = -1

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


#: Reports progress: (text describing what runs now, how many units just finished).
Progress = Callable[[str, int], None]


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


def run_sessions(
    sessions: List[Session], progress: Progress, origin: Optional[float] = None
) -> None:
    """Run every session in turn; a runner that fails or is missing never stops the run.

    KeyboardInterrupt stops the current session (its engines are aborted), marks the
    rest as not run, and propagates.

    :param origin: the ``time.perf_counter()`` the batches' start times count from
    """
    origin = clock() if origin is None else origin
    for index, session in enumerate(sessions):
        counted = _CountedProgress(progress)
        try:
            _run_session(session, counted, origin)
        except BaseException as exc:
            for unfinished in sessions[index:]:
                unfinished.give_up("not run", f"interrupted ({type(exc).__name__})")
            raise
        finally:
            # Whatever the session skipped or left unfinished still moves the bar.
            progress("", max(0, session.units - counted.done))


class _CountedProgress:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.done = 0

    def __call__(self, text: str, units: int) -> None:
        self.done += units
        self.progress(text, units)


def _run_session(session: Session, progress: Progress, origin: float) -> None:
    family = session.family
    missing = family.missing_requirement()
    if missing:
        session.give_up("skipped", missing)
        return
    if session.is_prefect:
        try:
            _run_prefect_session(session, progress, origin)
        finally:
            leftover = family.cleanup()
            if leftover:
                record = session.contenders[0].record
                record.note = "; ".join(filter(None, [record.note, leftover]))
        return
    if not _open_shared(session, progress):
        return
    try:
        _take_turns(session, progress, origin)
    finally:
        _close_shared(session, progress)


def _run_prefect_session(session: Session, progress: Progress, origin: float) -> None:
    (contender,) = session.contenders
    try:
        contender.engine = contender.make_engine()
    except RunnerUnavailable as exc:
        session.give_up(exc.status, str(exc))
        return
    except Exception as exc:
        session.give_up("failed", f"construction failed: {_describe(exc)}")
        return
    # The peer runs the session inside a Prefect flow of its own.
    contender.engine.drive(
        partial(_take_turns, session, progress, origin), contender.record, session.give_up
    )


def _open_shared(session: Session, progress: Progress) -> bool:
    shared, record = session.shared, session.cluster_record
    if shared is None or record is None:
        return True
    progress(f"{session.family.title} · starting the shared cluster", 0)
    started = clock()
    try:
        shared.open()
    except BaseException as exc:
        record.startup_seconds = clock() - started
        _close_quietly(shared)
        session.family.cleanup()
        if not isinstance(exc, Exception):
            raise
        session.give_up("failed", f"the shared cluster did not start: {_describe(exc)}")
        return False
    record.startup_seconds = clock() - started
    progress("", 1)
    return True


def _close_shared(session: Session, progress: Progress) -> None:
    shared, record = session.shared, session.cluster_record
    try:
        if shared is not None and record is not None and shared.address is not None:
            stopping = clock()
            try:
                shared.close()
            except Exception as exc:
                record.note = f"shut-down failed: {_describe(exc)}"
            record.shutdown_seconds = clock() - stopping
            if record.status == "pending":
                record.status = "ok"
            progress("", 1)
    finally:
        leftover = session.family.cleanup()
        if leftover and record is not None:
            record.note = "; ".join(filter(None, [record.note, leftover]))


def _close_quietly(shared: SharedCluster) -> None:
    try:
        shared.close()
    except Exception:
        pass


def _take_turns(session: Session, progress: Progress, origin: float) -> None:
    """Open every engine, run each workload's rounds, close every engine."""
    try:
        for contender in session.contenders:
            _open(session, contender, progress)
        for workload in session.workloads:
            _run_workload(session, workload, progress, origin)
        for contender in reversed(session.contenders):
            _close(session, contender, progress)
    except BaseException as exc:
        # An interrupt, or a fault of the harness: each engine's own failures are
        # handled where they occur.
        for contender in reversed(session.contenders):
            engine, contender.engine = contender.engine, None
            if engine is not None:
                _abort_quietly(engine, exc)
        if not isinstance(exc, Exception):
            session.give_up("not run", f"interrupted ({type(exc).__name__})")
            raise
        session.give_up("failed", f"the session stopped: {_describe(exc)}")


def _open(session: Session, contender: Contender, progress: Progress) -> None:
    record = contender.record
    if contender.engine is None:
        try:
            contender.engine = contender.make_engine()
        except RunnerUnavailable as exc:
            contender.give_up(exc.status, str(exc))
            return
        except Exception as exc:
            contender.give_up("failed", f"construction failed: {_describe(exc)}")
            return
    engine = contender.engine
    record.engine = engine.name
    for cell in contender.cells.values():
        cell.engine = engine.name
    if session.shared is not None:
        record.note = session.shared.note()
    progress(f"{session.family.title} {contender.mode} · starting", 0)
    started = clock()
    try:
        engine.open()
    except Exception as exc:
        contender.engine = None
        contender.give_up("failed", f"start-up failed: {_describe(exc)}")
        return
    record.startup_seconds = clock() - started
    try:
        first = FIRST_CALL[not engine.accepts_plain]
        problem = engine.check(engine.run_batch(first, {}, 1, session.config.batch_timeout))
        if problem:
            raise RuntimeError(problem)
    except Exception as exc:
        _engine_failed(contender, f"the first call failed: {_describe(exc)}", exc)
        return
    record.first_result_seconds = clock() - started
    progress("", 1)


def _close(session: Session, contender: Contender, progress: Progress) -> None:
    engine, contender.engine = contender.engine, None
    if engine is None:
        return
    record = contender.record
    progress(f"{session.family.title} {contender.mode} · stopping", 0)
    stopping = clock()
    try:
        engine.close()
    except Exception as exc:
        record.note = "; ".join(filter(None, [record.note, f"shut-down failed: {_describe(exc)}"]))
    record.shutdown_seconds = clock() - stopping
    if record.status == "pending":
        record.status = "ok"
    progress("", 1)


def _run_workload(session: Session, workload: Workload, progress: Progress, origin: float) -> None:
    config, family = session.config, session.family
    taking_part = [c for c in session.contenders if workload.name in c.cells]
    kwargs = workload.kwargs(config.spin_iterations)
    repeats = config.repeats_for(workload)
    for round_ in range(repeats + 1):
        # Round 0 is the warm-up; each round starts one engine later than the last.
        turn = round_ % len(taking_part)
        for contender in taking_part[turn:] + taking_part[:turn]:
            cell = contender.cells[workload.name]
            engine = contender.engine
            if engine is None or cell.status != "pending":
                continue
            if round_ == 0:
                calls = cell.warmup_calls = config.warmup(workload, family, contender.mode, cell.calls)
            else:
                calls = cell.calls
            progress(
                f"{family.title} {contender.mode} · {workload.name} · "
                + ("warm-up" if round_ == 0 else f"run {round_}/{repeats}"),
                0,
            )
            begun = clock()
            try:
                results = engine.run_batch(workload.run_fn, kwargs, calls, config.batch_timeout)
                took = clock() - begun
                problem = engine.check(results)
            except Exception as exc:
                cell.status, cell.note = "failed", _describe(exc)
                _engine_failed(contender, f"{workload.name} failed: {cell.note}", exc)
                progress("", 1)
                continue
            if problem is not None:
                cell.status, cell.note = "failed", problem
            elif round_ == 0:
                cell.warmup_seconds.append(took)
            else:
                cell.seconds.append(took)
                cell.started.append(round(begun - origin, 6))
            progress("", 1)
    for contender in taking_part:
        cell = contender.cells[workload.name]
        if cell.status == "pending" and contender.engine is not None:
            cell.status = "ok"


def _engine_failed(contender: Contender, where: str, exc: BaseException) -> None:
    """An engine raised: abort it, and mark what it had left to do."""
    engine, contender.engine = contender.engine, None
    if engine is not None:
        _abort_quietly(engine, exc)
    contender.record.status = "failed"
    contender.record.note = where
    contender.give_up("not run", f"not run: the engine stopped after {where}")


def _abort_quietly(engine: SyncEngine, exc: BaseException) -> None:
    try:
        engine.abort(exc)
    except BaseException:
        pass


def _describe(exc: BaseException, limit: int = 240) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
