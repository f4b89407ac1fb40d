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

import time
from functools import partial
from typing import Callable, List, Optional

from benchmarks.clusters import SharedCluster
from benchmarks.engines import SyncEngine
from benchmarks.families import RunnerUnavailable
from benchmarks.sessions import Contender, Session
from benchmarks.workloads import FIRST_CALL, Workload

__all__ = ["run_sessions"]

clock = time.perf_counter

#: Reports progress: (text describing what runs now, how many units just finished).
Progress = Callable[[str, int], None]


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
