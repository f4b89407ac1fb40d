"""The measurement: a plan of sessions, each a started engine running timed batches.

A session opens one engine (timed: start-up, and start-to-first-result), then runs,
for each workload, one warm-up batch and ``repeats`` timed batches, and closes the
engine (timed: shut-down). A batch is timed from the first submission to the last
result; start-up is never inside it. A cell (workload x runner x mode) reports the
median of its timed batches.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional

import anyio

from benchmarks.engines import (
    FAMILIES,
    EngineSettings,
    Family,
    RunnerUnavailable,
    SharedCluster,
)
from benchmarks.workloads import FIRST_CALL, Workload

__all__ = ["Config", "Cell", "SessionRecord", "Session", "plan_sessions", "run_sessions"]

#: The modes a runner is measured in, in the order they run and are shown.
MODES = ("raw", "twin", "facade", "prefect")

clock = time.perf_counter


@dataclass(frozen=True)
class Config:
    """Everything that decides what one run measures.

    :param batch_seconds: a batch whose calls would take longer than this, by the
        nominal duration of a call and the runner's concurrency, gets fewer calls
    :param batch_timeout: a batch still running after this many seconds fails
    :param share_clusters: one Dask cluster and one Ray instance per runner, joined by
        its raw engine and both runner modes, instead of one each (quicker to start)
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
    share_clusters: bool = False

    def calls(self, workload: Workload, family: Family, mode: str = "raw") -> int:
        """How many calls a batch of ``workload`` makes on ``family``'s engines.

        The workload's default, unless a batch would then take longer than
        ``batch_seconds``; then the largest round number of calls that fits, and at
        least two calls per worker. The raw engine and both runner modes of a family
        always get the same count; Prefect's runners, much slower per call, may get
        fewer.
        """
        default = workload.quick_calls if self.quick else workload.calls
        per_call = self._seconds_per_call(workload, family, mode)
        if default * per_call <= self.batch_seconds:
            return default
        at_once = family.concurrent_calls(workload, self.engine_settings.workers)
        floor = 2 * int(at_once) if math.isfinite(at_once) else 2
        return min(default, max(floor, _round_down(self.batch_seconds / per_call)))

    def warmup(self, workload: Workload, family: Family, mode: str, calls: int) -> int:
        """Calls in the untimed warm-up batch: the whole batch when it is cheap.

        A cheap warm-up batch the size of the timed ones leaves pools grown to the
        size the timed batches need (threads, Ray workers), as in a long-running program.
        """
        if calls * self._seconds_per_call(workload, family, mode) <= self.batch_seconds / 4:
            return calls
        return min(calls, self.warmup_calls)

    def _seconds_per_call(self, workload: Workload, family: Family, mode: str) -> float:
        at_once = family.concurrent_calls(workload, self.engine_settings.workers)
        dispatch = family.seconds_per_dispatch
        if mode == "prefect":
            dispatch = max(dispatch, family.peer_seconds_per_dispatch)
        return max(dispatch, workload.seconds_per_call / at_once)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "workloads": list(self.workloads),
            "runners": list(self.families),
            "repeats": self.repeats,
            "quick": self.quick,
            "batch_seconds": self.batch_seconds,
            "batch_timeout": self.batch_timeout,
            "warmup_calls": self.warmup_calls,
            "cpu_spin_iterations": self.spin_iterations,
            "cpu_spin_seconds": self.spin_seconds,
            "engines": self.engine_settings.as_dict(),
            "peers": self.peers,
            "share_clusters": self.share_clusters,
        }


def _round_down(value: float) -> int:
    """The largest number of the form d * 10**k (d a digit) not above ``value``."""
    if value < 1:
        return 1
    magnitude = 10 ** int(math.log10(value))
    return int(value // magnitude) * magnitude


@dataclass
class Cell:
    """One workload on one runner in one mode: the timed batches and their median."""

    workload: str
    family: str
    mode: str
    engine: str = ""
    calls: int = 0
    status: str = "pending"  # ok, failed, skipped, not run
    note: str = ""
    warmup_seconds: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)

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
    """How one engine started and stopped."""

    family: str
    mode: str
    engine: str = ""
    workloads: List[str] = field(default_factory=list)
    status: str = "pending"  # ok, failed, skipped, not run
    note: str = ""
    startup_seconds: Optional[float] = None
    first_result_seconds: Optional[float] = None
    shutdown_seconds: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Batch:
    cell: Cell
    workload: Workload
    fn: Callable[..., Any]
    kwargs: Dict[str, Any]
    calls: int
    warmup: bool


#: Reports progress: (text describing what runs now, how many units just finished).
Progress = Callable[[str, int], None]


@dataclass
class Session:
    """One engine, opened once, running the batches of some workloads."""

    family: Family
    mode: str
    make_engine: Callable[[], Any]
    workloads: List[Workload]
    cells: Dict[str, Cell]
    record: SessionRecord
    config: Config
    shared: Optional[SharedCluster] = None

    @property
    def units(self) -> int:
        """Progress units: opening, each batch, closing."""
        return 2 + len(self.workloads) * (1 + self.config.repeats)

    def batches(self, progress: Progress) -> Iterator[Batch]:
        config = self.config
        for workload in self.workloads:
            cell = self.cells[workload.name]
            kwargs = workload.kwargs(config.spin_iterations)
            warmup = config.warmup(workload, self.family, self.mode, cell.calls)
            sizes = [warmup] + [cell.calls] * config.repeats
            for index, calls in enumerate(sizes):
                if cell.status == "failed":
                    progress("", len(sizes) - index)
                    break
                progress(
                    f"{self.family.title} {self.mode} · {workload.name} · "
                    + ("warm-up" if index == 0 else f"run {index}/{config.repeats}"),
                    0,
                )
                yield Batch(cell, workload, workload.run_fn, kwargs, calls, index == 0)
                progress("", 1)
            if cell.status == "pending":
                cell.status = "ok"

    def finish_batch(self, batch: Batch, seconds: float, problem: Optional[str]) -> None:
        cell = batch.cell
        if problem is not None:
            cell.status = "failed"
            cell.note = problem
            return
        (cell.warmup_seconds if batch.warmup else cell.seconds).append(seconds)

    def set_engine(self, engine: Any) -> None:
        self.record.engine = engine.name
        for cell in self.cells.values():
            cell.engine = engine.name

    def give_up(self, status: str, note: str) -> None:
        """Mark every cell not yet finished with ``status``."""
        if self.record.status == "pending":
            self.record.status = status
            self.record.note = note
        for cell in self.cells.values():
            if cell.status == "pending":
                cell.status = status
                cell.note = note


def plan_sessions(config: Config) -> List[Session]:
    """The sessions of one run, in the order they run.

    Per runner: its raw engine (split into a plain and an async engine where the raw
    floor differs, e.g. a thread pool and an anyio task group), then the blocking twin,
    then the async facade. Prefect's runners, when peers are on, come after all of
    them: importing Prefect reconfigures logging for the whole process.
    """
    from benchmarks.workloads import WORKLOADS

    settings = config.engine_settings
    workloads = [WORKLOADS[name] for name in config.workloads]
    ours: List[tuple] = []
    peers: List[tuple] = []
    for family in (FAMILIES[key] for key in config.families):
        shared = None
        if config.share_clusters and family.shares_cluster:
            shared = SharedCluster(family.key, settings)
        if family.raw_async is None:
            make = partial(family.raw_engine, settings, False, shared)
            ours.append((family, "raw", make, workloads, shared))
        else:
            for is_async in (False, True):
                chosen = [w for w in workloads if w.is_async == is_async]
                if chosen:
                    make = partial(family.raw_engine, settings, is_async, shared)
                    ours.append((family, "raw", make, chosen, shared))
        ours.append((family, "twin", partial(family.twin, settings, shared), workloads, shared))
        ours.append(
            (family, "facade", partial(family.facade, settings, shared), workloads, shared)
        )
        if config.peers and family.peer:
            from benchmarks.peers import peer_engine

            make = partial(peer_engine, family, settings)
            peers.append((family, "prefect", make, workloads, None))
    sessions = []
    for family, mode, make_engine, chosen, shared in ours + peers:
        cells = {
            w.name: Cell(w.name, family.key, mode, calls=config.calls(w, family, mode))
            for w in chosen
        }
        record = SessionRecord(family.key, mode, workloads=[w.name for w in chosen])
        sessions.append(
            Session(family, mode, make_engine, chosen, cells, record, config, shared)
        )
    return sessions


def run_sessions(sessions: List[Session], progress: Progress) -> None:
    """Run every session in turn; a runner that fails or is missing never stops the run.

    A shared cluster is opened before the first session that joins it and closed
    after the last. KeyboardInterrupt stops the current session (its engine is
    aborted), marks the rest as not run, and propagates.
    """
    shared: Optional[SharedCluster] = None
    try:
        for index, session in enumerate(sessions):
            if session.shared is not shared:
                _close_shared(shared, sessions[index - 1].family)
                shared = _open_shared(session, sessions[index:], progress)
            counted = _CountedProgress(progress)
            try:
                _run_session(session, counted)
            except BaseException as exc:
                for unfinished in sessions[index:]:
                    unfinished.give_up("not run", f"interrupted ({type(exc).__name__})")
                raise
            finally:
                # Whatever the session skipped or left unfinished still moves the bar.
                progress("", max(0, session.units - counted.done))
    finally:
        if shared is not None:
            _close_shared(shared, FAMILIES[shared.family_key])


def _open_shared(
    session: Session, rest: List[Session], progress: Progress
) -> Optional[SharedCluster]:
    shared = session.shared
    if shared is None or session.family.missing_requirement():
        return None
    progress(f"{session.family.title} · starting the shared cluster", 0)
    try:
        shared.open()
    except Exception as exc:
        for later in rest:
            if later.shared is shared:
                later.give_up("failed", f"the shared cluster did not start: {_describe(exc)}")
        session.family.cleanup()
        return None
    return shared


def _close_shared(shared: Optional[SharedCluster], family: Family) -> None:
    if shared is None:
        return
    try:
        shared.close()
    finally:
        family.cleanup()


class _CountedProgress:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.done = 0

    def __call__(self, text: str, units: int) -> None:
        self.done += units
        self.progress(text, units)


def _run_session(session: Session, progress: Progress) -> None:
    missing = session.family.missing_requirement()
    if missing:
        session.give_up("skipped", missing)
        return
    try:
        engine = session.make_engine()
    except RunnerUnavailable as exc:
        session.give_up("skipped", str(exc))
        return
    except Exception as exc:
        session.give_up("failed", f"construction failed: {_describe(exc)}")
        return
    session.set_engine(engine)
    if session.shared is not None:
        session.record.note = session.shared.note()
    progress(f"{session.family.title} {session.mode} · starting", 0)
    try:
        if engine.is_async:
            anyio.run(_drive_async, session, engine, progress)
        elif getattr(engine, "drives_itself", False):
            engine.drive(session, _drive_sync, progress)
        else:
            _drive_sync(session, engine, progress)
    except Exception as exc:  # the drivers catch what batches raise; this is the engine's own
        session.give_up("failed", _describe(exc))
    finally:
        # A shared cluster stays up for the next session; it is cleaned up when closed.
        leftover = session.family.cleanup() if session.shared is None else None
        if leftover:
            session.record.note = "; ".join(filter(None, [session.record.note, leftover]))


def _describe(exc: BaseException, limit: int = 240) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _drive_sync(session: Session, engine: Any, progress: Progress) -> None:
    record, timeout = session.record, session.config.batch_timeout
    started = clock()
    try:
        engine.open()
    except Exception as exc:
        session.give_up("failed", f"start-up failed: {_describe(exc)}")
        return
    record.startup_seconds = clock() - started
    batch: Optional[Batch] = None
    try:
        first = FIRST_CALL[not engine.accepts_plain]
        problem = engine.check(engine.run_batch(first, {}, 1, timeout))
        record.first_result_seconds = clock() - started
        if problem:
            raise RuntimeError(f"the first call failed: {problem}")
        progress("", 1)
        for batch in session.batches(progress):
            begun = clock()
            results = engine.run_batch(batch.fn, batch.kwargs, batch.calls, timeout)
            took = clock() - begun
            session.finish_batch(batch, took, engine.check(results))
        batch = None
    except BaseException as exc:
        _abort_quietly(engine.abort, exc)
        _session_failed(session, batch, exc, progress)
        if not isinstance(exc, Exception):
            raise
        return
    stopping = clock()
    try:
        engine.close()
    except Exception as exc:
        record.note = f"shut-down failed: {_describe(exc)}"
    record.shutdown_seconds = clock() - stopping
    record.status = "ok"
    progress("", 1)


async def _drive_async(session: Session, engine: Any, progress: Progress) -> None:
    record, timeout = session.record, session.config.batch_timeout
    started = clock()
    try:
        await engine.open()
    except Exception as exc:
        session.give_up("failed", f"start-up failed: {_describe(exc)}")
        return
    record.startup_seconds = clock() - started
    batch: Optional[Batch] = None
    try:
        first = FIRST_CALL[not engine.accepts_plain]
        problem = engine.check(await engine.run_batch(first, {}, 1, timeout))
        record.first_result_seconds = clock() - started
        if problem:
            raise RuntimeError(f"the first call failed: {problem}")
        progress("", 1)
        for batch in session.batches(progress):
            begun = clock()
            results = await engine.run_batch(batch.fn, batch.kwargs, batch.calls, timeout)
            took = clock() - begun
            session.finish_batch(batch, took, engine.check(results))
        batch = None
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            try:
                await engine.abort(exc)
            except BaseException:
                pass
        _session_failed(session, batch, exc, progress)
        if not isinstance(exc, Exception):
            raise
        return
    stopping = clock()
    try:
        await engine.close()
    except Exception as exc:
        record.note = f"shut-down failed: {_describe(exc)}"
    record.shutdown_seconds = clock() - stopping
    record.status = "ok"
    progress("", 1)


def _abort_quietly(abort: Callable[[BaseException], Any], exc: BaseException) -> None:
    try:
        abort(exc)
    except BaseException:
        pass


def _session_failed(
    session: Session, batch: Optional[Batch], exc: BaseException, progress: Progress
) -> None:
    if not isinstance(exc, Exception):
        session.give_up("not run", f"interrupted ({type(exc).__name__})")
        return
    note = _describe(exc)
    if batch is not None:
        batch.cell.status = "failed"
        batch.cell.note = note
        where = f"{batch.workload.name} failed: {note}"
    else:
        where = f"the first call failed: {note}"
    session.record.status = "failed"
    session.record.note = where
    session.give_up("not run", f"not run: the session stopped after {where}")
