"""The blocking ParallelTaskRunner: calls in loky worker processes.

The path of a call: ``submit`` pickles run_fn and its arguments and queues the call
in this process; a feeder thread hands it to the current loky executor, which puts
it on its workers' queue; a worker marks it started in a slot table, runs it and
pickles its State; loky's manager thread settles the call with that State.

Hazards this module exists to handle, each with its own State and message:

- A worker dies mid-call (``os._exit``, a signal, a segfault). loky then marks every
  call it holds as failed with ``TerminatedWorkerError`` and kills the other
  workers, whether their calls had started or not. To tell those apart, each worker
  marks a call as started (and as finished) in a slot table, a small file mapped
  into memory by the parent and by every worker of one pool. After a break, calls
  that never started go to a fresh pool; calls that had started are Crashed, with a
  message saying which worker died and how; no call runs twice.
- A value that cannot be pickled. Arguments are pickled in the parent before the
  call is handed over, and results in the worker before they are sent back, so a
  pickling error becomes that call's Crashed state and never breaks the pool. A
  result's pickling error is sent back rebuilt (same type, same message): the
  original may hold the very value that cannot be pickled.
- Cancelling a call loky holds. loky's shutdown with ``kill_workers`` sets an
  exception on each future it still holds, and fails on one already cancelled: its
  manager thread prints an ``InvalidStateError`` traceback and breaks the pool. So
  loky's futures are never cancelled. A call waits in this process, where it can be
  cancelled, until loky has room for it on its workers' queue; from the moment it
  is handed over it is running and cannot be cancelled, as in ProcessPoolExecutor.
- Leaving the ``start()`` block with an exception: calls not started are cancelled
  and the workers are killed, without waiting for running calls.
- Keeping finished calls alive. A call's State may be large, and its caller's
  future is meant to be the last thing holding it: no queue, thread or callback of
  the pool refers to a call once it is settled.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import functools
import itertools
import logging
import mmap
import os
import pickle
import shutil
import signal
import struct
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Tuple

import cloudpickle
import loky
from loky.backend import resource_tracker
from loky.process_executor import (
    EXTRA_QUEUED_CALLS,
    BrokenProcessPool,
    ShutdownExecutorError,
    TerminatedWorkerError,
)

from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType
from taskrunners._core.calls import Call
from taskrunners._core.remote import run_in_worker
from taskrunners.futures import TaskRun
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["ParallelTaskRunner"]

# One slot per call handed to a pool: (pid of the worker that started the call, pid
# of the worker that finished it), 0 meaning "not yet".
_SLOT = struct.Struct("=ii")
_PID = struct.Struct("=i")
# A call that meets this many broken pools before any worker starts it is Crashed
# instead of being handed to yet another pool.
_MAX_HANDOVERS = 3
_INITIALIZER_ERROR_FILE = "initializer-error"
_PROTOCOL = pickle.HIGHEST_PROTOCOL
# How often (seconds) a worker checks that the process that started it is alive.
_PARENT_CHECK_INTERVAL = 0.5


# -- in the worker process ----------------------------------------------------------


class _RecordCollector(logging.Handler):
    """Keeps the log records the running call's own thread emits, made picklable."""

    def __init__(self) -> None:
        super().__init__()
        self.thread: Optional[int] = None
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(_picklable_record(record))


_worker_tables: Dict[str, mmap.mmap] = {}
_collector: Optional[_RecordCollector] = None
_formatter = logging.Formatter()


def _slot_table(path: str) -> mmap.mmap:
    table = _worker_tables.get(path)
    if table is None:
        with open(path, "r+b") as file:
            table = mmap.mmap(file.fileno(), 0)
        _worker_tables[path] = table
    return table


def _picklable_record(record: logging.LogRecord) -> logging.LogRecord:
    prepared = copy.copy(record)
    prepared.msg = record.getMessage()
    prepared.args = None
    if record.exc_info:
        prepared.exc_text = record.exc_text or _formatter.formatException(record.exc_info)
    prepared.exc_info = None
    return prepared


_PLAIN_TYPES = (str, int, float, bool, type(None))


def _plain_record(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose extra attributes are made plain (for pickling)."""
    attributes = {
        key: value if isinstance(value, _PLAIN_TYPES) else repr(value)
        for key, value in record.__dict__.items()
    }
    return logging.makeLogRecord(attributes)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _portable_error(exc: Exception) -> Exception:
    """An exception with the type and message of ``exc`` that pickles.

    ``exc`` itself may hold the value that could not be pickled; where its type
    cannot be rebuilt from the message alone, a ``PicklingError`` carries it.
    """
    message = str(exc)
    try:
        rebuilt = type(exc)(message)
        if str(rebuilt) == message:
            cloudpickle.dumps(rebuilt)
            return rebuilt
    except Exception:
        pass
    return pickle.PicklingError(message)


def _encode_result(name: str, state: State, records: List[logging.LogRecord]) -> bytes:
    result = (state, records or None)
    try:
        # Plain pickle is several times faster. For what only cloudpickle can send (a
        # class or function that came here by value) it fails instead of writing a
        # reference, since the name does not lead back to the same object here.
        return pickle.dumps(result, _PROTOCOL)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(result, _PROTOCOL)
    except Exception:
        pass
    records = [_plain_record(record) for record in records]
    try:
        cloudpickle.dumps(state)
    except Exception as exc:
        message = (
            f"The State returned by task run {name!r} could not be pickled to send it back "
            f"from the worker process: {_describe(exc)}. Return only data that cloudpickle "
            "can serialize."
        )
        state = Crashed(message=message, data=_portable_error(exc))
    return cloudpickle.dumps((state, records or None), _PROTOCOL)


def _run_in_worker(
    payload: bytes, name: str, table_path: str, slot: int, log_level: int
) -> bytes:
    """Run one call in a worker process; returns its pickled (State, log records)."""
    global _collector
    pid = os.getpid()
    table = _slot_table(table_path)
    offset = slot * _SLOT.size
    _PID.pack_into(table, offset, pid)
    collector = _collector
    if collector is None:
        collector = _collector = _RecordCollector()
    collector.thread = threading.get_ident()
    collector.setLevel(log_level)
    root = logging.getLogger()
    if root.level != log_level:  # the worker's threshold follows the parent's
        root.setLevel(log_level)
    root.addHandler(collector)
    try:
        try:
            run_fn, run_kwargs = cloudpickle.loads(payload)
        except BaseException as exc:
            state = Crashed(
                message=f"Task run {name!r} could not be unpickled in the worker process: "
                f"{_describe(exc)}. Make sure the workers can import every module that "
                "run_fn and its arguments refer to.",
                data=exc,
            )
        else:
            del payload
            state = run_in_worker(run_fn, run_kwargs)[0]
            del run_fn, run_kwargs
    finally:
        root.removeHandler(collector)
        records, collector.records = collector.records, []
    result = _encode_result(name, state, records)
    _PID.pack_into(table, offset + _PID.size, pid)
    return result


def _initialize_worker(
    parent_pid: int,
    error_path: str,
    initializer: Optional[Callable[..., Any]],
    initargs: Tuple[Any, ...],
) -> None:
    # A worker blocks on loky's queue forever once its parent is gone (killed with
    # SIGKILL, say): leave with it instead of lingering as an orphan.
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent", daemon=True
    ).start()
    if initializer is None:
        return
    try:
        initializer(*initargs)
    except BaseException:
        # loky only logs the error and lets the worker exit: keep it for the parent.
        with open(error_path, "w") as file:
            file.write(traceback.format_exc())
        raise


def _exit_with_parent(parent_pid: int) -> None:
    # An orphan is adopted by another process; on Windows the check never fires.
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_CHECK_INTERVAL)
    os._exit(1)


# -- in the parent process ----------------------------------------------------------


def _cancelled_state() -> State:
    return exception_to_crashed_state(concurrent.futures.CancelledError())


def _decode_result(name: str, data: bytes) -> Tuple[State, Optional[List[logging.LogRecord]]]:
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        message = (
            f"The State of task run {name!r} could not be unpickled in this process: "
            f"{_describe(exc)}. Return only data this process can import."
        )
        return Crashed(message=message, data=exc), None


def _emit(records: Iterable[logging.LogRecord]) -> None:
    for record in records:
        logger = logging.getLogger(record.name)
        try:
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        except Exception:  # as logging does: a broken filter must not fail the call
            traceback.print_exc()


def _describe_exit(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "stopped for an unknown reason"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def _dead_workers(executor: loky.ProcessPoolExecutor) -> Dict[int, Optional[int]]:
    """Exit codes of the workers that have stopped, by pid.

    Reads loky's private map of worker processes, from the first callback of a
    break: loky runs the callbacks before it kills the surviving workers (and
    empties that map), so these are the workers that died on their own.
    """
    processes = getattr(executor, "_processes", None) or {}
    return {pid: p.exitcode for pid, p in list(processes.items()) if p.exitcode is not None}


class _Call(Call):
    """One call on its way through the pool; its result is the call's State.

    As a ProcessPoolExecutor future: it can be cancelled while it waits in this
    process, and is running from the moment it is handed to loky until it is done
    (also while it waits for a fresh pool after a break, as it cannot be withdrawn
    from the broken one before loky gives it back).
    """

    __slots__ = ("task_run", "payload", "handovers")

    def __init__(self, task_run: TaskRun, payload: Optional[bytes]) -> None:
        super().__init__()
        self.task_run = task_run
        self.payload = payload
        self.handovers = 0

    def running(self) -> bool:
        return self._running and self._state is None

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self.payload = None
        return cancelled

    def set_cancelled(self) -> None:
        """End a call that never started, because the pool stopped first, as cancelled."""
        with self._lock:
            if self._state is None:
                self._cancelled = True
        _finish(self, _cancelled_state())


def _finish(call: _Call, state: State) -> None:
    call.payload = None
    call.set_result(state)


class _Generation:
    """One loky executor and the slot table its workers mark calls in."""

    def __init__(
        self,
        number: int,
        directory: str,
        max_workers: int,
        slots: int,
        initializer: Optional[Callable[..., Any]],
        initargs: Tuple[Any, ...],
        env: Optional[Dict[str, str]],
    ) -> None:
        self.number = number
        self.path = os.path.join(directory, f"slots-{number}")
        with open(self.path, "w+b") as file:
            file.truncate(slots * _SLOT.size)
            self.table = mmap.mmap(file.fileno(), 0)
        self.executor = loky.ProcessPoolExecutor(
            max_workers=max_workers,
            initializer=_initialize_worker,
            initargs=(
                os.getpid(),
                os.path.join(directory, _INITIALIZER_ERROR_FILE),
                initializer,
                initargs,
            ),
            env=env,
        )
        self._fresh = itertools.count()
        self._freed: Deque[int] = collections.deque()
        # What broke the pool, and the exit codes of the workers that died on their
        # own (by pid), once known.
        self.broken: Optional[BaseException] = None
        self.dead: Optional[Dict[int, Optional[int]]] = None

    def take_slot(self) -> int:
        # Only the feeder thread takes slots; loky's manager thread gives them back.
        # The pool never has more calls in flight than the table has slots.
        try:
            slot = self._freed.pop()
        except IndexError:
            return next(self._fresh)
        _SLOT.pack_into(self.table, slot * _SLOT.size, 0, 0)
        return slot

    def give_back(self, slot: int) -> None:
        self._freed.append(slot)

    def marks(self, slot: int) -> Tuple[int, int]:
        """(pid that started the call in ``slot``, pid that finished it), 0 for not yet."""
        return _SLOT.unpack_from(self.table, slot * _SLOT.size)

    def cause(self) -> str:
        """Which workers died and how, for messages."""
        if self.dead:
            return "; ".join(
                f"worker process (pid {pid}) {_describe_exit(code)}"
                for pid, code in sorted(self.dead.items())
            )
        lines = str(self.broken or "").strip().splitlines()
        codes = [line.strip() for line in lines if "exit codes" in line]
        return (codes or lines or ["unknown cause"])[0]


class _ProcessPool:
    """The worker processes of one ``start()`` block, replaced whole when one dies.

    Calls wait in a queue in this process and a feeder thread hands them to the
    current loky executor, as many at a time as loky's call queue holds. Two hazards
    make that thread worth its cost. Calls made ready inside a callback on loky's
    manager thread (dependent calls, calls to retry after a break) would otherwise be
    submitted from that thread, and a burst of them fills its own wake-up pipe and
    deadlocks it. And a caller that submits in a loop both pickles (CPU-bound) and
    wakes loky's manager (a syscall) for every call, so the manager keeps waiting for
    the GIL and the workers starve.
    """

    def __init__(
        self,
        logger: logging.Logger,
        max_workers: int,
        initializer: Optional[Callable[..., Any]],
        initargs: Tuple[Any, ...],
        env: Optional[Dict[str, str]],
    ) -> None:
        self._logger = logger
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = initargs
        self._env = env
        # Worker records at or above the parent's root level travel back.
        self._log_level = logging.getLogger().level
        self._directory = tempfile.mkdtemp(prefix="taskrunners-parallel-")
        # Removed by loky's resource tracker if this process dies without cleaning up.
        resource_tracker.register(self._directory, "folder")
        self._cond = threading.Condition(threading.Lock())
        self._queue: Deque[_Call] = collections.deque()
        # Calls handed to loky and not yet settled, at most the size of loky's call
        # queue: loky moves each one to its workers' queue at once, so it never holds
        # a call that could still be cancelled (see the module's notes). More would
        # let very short calls go faster, and leave more calls that cannot be
        # cancelled though they have not started.
        self._in_flight = 0
        self._capacity = 2 * max_workers + EXTRA_QUEUED_CALLS
        self._stopping = False
        self._abort_reason: Optional[BaseException] = None
        self._generations: List[_Generation] = []
        self._generation = self._new_generation()
        self._feeder = threading.Thread(
            target=self._feed, name="ParallelTaskRunner-feeder", daemon=True
        )
        self._feeder.start()

    def _new_generation(self) -> _Generation:
        generation = _Generation(
            len(self._generations),
            self._directory,
            self._max_workers,
            self._capacity,
            self._initializer,
            self._initargs,
            self._env,
        )
        self._generations.append(generation)
        return generation

    # -- submission (any thread) ------------------------------------------------------

    def submit(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> _Call:
        # Pickled now: an unpicklable value fails this call alone, at once, and later
        # changes to the arguments do not reach the worker.
        try:
            payload = cloudpickle.dumps((run_fn, run_kwargs), _PROTOCOL)
        except Exception as exc:
            call = _Call(task_run, None)
            _finish(call, _pickling_failure(task_run, run_fn, exc))
            return call
        call = _Call(task_run, payload)
        self._enqueue(call)
        return call

    def _enqueue(self, call: _Call, first: bool = False) -> None:
        with self._cond:
            if not self._stopping:
                if first:
                    self._queue.appendleft(call)
                else:
                    self._queue.append(call)
                self._cond.notify()
                return
        call.set_cancelled()

    # -- the feeder thread ------------------------------------------------------------

    def _feed(self) -> None:
        while self._hand_over_next():
            pass

    def _hand_over_next(self) -> bool:
        """Hand the next queued call to loky once it has room; False once stopping.

        A frame of its own, so that no variable of the feeder keeps a call alive.
        """
        with self._cond:
            while not (self._stopping or (self._queue and self._in_flight < self._capacity)):
                self._cond.wait()
            if self._stopping:
                return False
            call = self._queue.popleft()
        try:
            self._hand_over(call)
        except BaseException as exc:  # a bug here must not leave the call hanging
            self._logger.exception("The feeder of the process pool failed.")
            _finish(call, exception_to_crashed_state(exc))
        return True

    def _hand_over(self, call: _Call) -> None:
        """Submit ``call`` to the current executor, or settle it if it cannot run."""
        if not call.handovers and not call.set_running():
            return  # cancelled while queued
        for _ in range(_MAX_HANDOVERS):
            generation = self._generation
            if generation.broken is not None:
                failure = self._initializer_failure(call)
                if failure is not None:  # a fresh pool would fail the same way
                    _finish(call, failure)
                    return
                generation = self._replace(generation)
            if generation is None or self._stopping:
                call.set_cancelled()
                return
            slot = generation.take_slot()
            try:
                submitted = generation.executor.submit(
                    _run_in_worker,
                    call.payload,
                    call.task_run.name,
                    generation.path,
                    slot,
                    self._log_level,
                )
            except BrokenProcessPool as exc:
                generation.broken = generation.broken or exc
                continue  # on a fresh pool
            except ShutdownExecutorError:
                call.set_cancelled()
                return
            except Exception as exc:  # e.g. no worker process could be started
                generation.give_back(slot)
                message = (
                    f"Task run {call.task_run.name!r} could not be handed to the worker "
                    f"processes: {_describe(exc)}"
                )
                _finish(call, Crashed(message=message, data=exc))
                return
            call.handovers += 1
            with self._cond:
                self._in_flight += 1
            submitted.add_done_callback(functools.partial(self._on_done, call, generation, slot))
            return
        message = (
            f"Task run {call.task_run.name!r} could not be handed to the worker processes: "
            f"every new pool broke at once ({self._generation.cause()})."
        )
        _finish(call, Crashed(message=message, data=TerminatedWorkerError(message)))

    def _replace(self, broken: _Generation) -> Optional[_Generation]:
        with self._cond:
            if self._stopping:
                return None
            if self._generation is broken:
                self._generation = self._new_generation()
                self._logger.warning(
                    "The process pool broke (%s); continuing on a fresh pool of %d workers.",
                    broken.cause(),
                    self._max_workers,
                )
            return self._generation

    # -- outcomes (loky's manager thread) ---------------------------------------------

    def _on_done(
        self, call: _Call, generation: _Generation, slot: int, submitted: concurrent.futures.Future
    ) -> None:
        try:
            self._settle(call, generation, slot, submitted)
        except BaseException as exc:  # loky would only log it, and the call would hang
            self._logger.exception("Settling task run %r failed.", call.task_run.name)
            _finish(call, exception_to_crashed_state(exc))
        finally:
            # No worker writes to the slot any more: either the call came back, or the
            # executor is broken or shut down and takes no other call.
            generation.give_back(slot)
            with self._cond:
                self._in_flight -= 1
                self._cond.notify()

    def _settle(
        self, call: _Call, generation: _Generation, slot: int, submitted: concurrent.futures.Future
    ) -> None:
        try:
            data = submitted.result(0)
        except BaseException as exc:
            error = exc
        else:
            state, records = _decode_result(call.task_run.name, data)
            if records:
                _emit(records)
            _finish(call, state)
            return
        if isinstance(error, ShutdownExecutorError) or self._abort_reason is not None:
            started = generation.marks(slot)[0]
            if started:
                _finish(call, self._stopped_state(call, started))
            else:
                call.set_cancelled()
        elif not isinstance(error, BrokenProcessPool):
            message = (
                f"The process pool could not run task run {call.task_run.name!r}: "
                f"{_describe(error)}"
            )
            _finish(call, Crashed(message=message, data=error))
        else:
            self._after_break(call, generation, slot, error)

    def _after_break(
        self, call: _Call, generation: _Generation, slot: int, error: BaseException
    ) -> None:
        with self._cond:
            generation.broken = generation.broken or error
            if generation.dead is None:
                generation.dead = _dead_workers(generation.executor)
        started, finished = generation.marks(slot)
        if started:
            _finish(call, _broken_pool_state(call, generation, started, finished))
            return
        state = self._never_started_state(call, generation)
        if state is None:
            self._enqueue(call, first=True)  # it was next in line, on a fresh pool
        else:
            _finish(call, state)

    def _initializer_failure(self, call: _Call) -> Optional[State]:
        """A Crashed state if the workers' initializer failed, else None."""
        error_path = os.path.join(self._directory, _INITIALIZER_ERROR_FILE)
        if not os.path.exists(error_path):
            return None
        with open(error_path) as file:
            details = file.read().strip()
        last_line = details.splitlines()[-1] if details else "an error"
        message = (
            f"Task run {call.task_run.name!r} could not start: the worker processes' "
            f"`initializer` raised {last_line}. Fix the initializer given to "
            f"ParallelTaskRunner.\n{details}"
        )
        return Crashed(message=message, data=RuntimeError(message))

    def _never_started_state(self, call: _Call, generation: _Generation) -> Optional[State]:
        """The State of a call whose pool broke before it started; None to retry it."""
        failure = self._initializer_failure(call)
        if failure is not None or call.handovers < _MAX_HANDOVERS:
            return failure
        message = (
            f"Task run {call.task_run.name!r} never started: the process pool broke "
            f"{call.handovers} times before a worker took it (last: {generation.cause()})."
        )
        return Crashed(message=message, data=TerminatedWorkerError(message))

    def _stopped_state(self, call: _Call, started: int) -> State:
        message = (
            f"Task run {call.task_run.name!r} was stopped in worker process (pid {started}): "
            f"the runner's start() block was left with {self._abort_reason!r}, which "
            "terminates the worker processes."
        )
        return Crashed(message=message, data=concurrent.futures.CancelledError(message))

    # -- shutdown (the thread leaving the start() block) ------------------------------

    def shutdown(self) -> None:
        """Stop the workers; every call has finished."""
        self._stop(None)

    def terminate(self, reason: BaseException) -> None:
        """Cancel calls not started and kill the workers, without waiting for calls."""
        self._stop(reason)

    def _stop(self, reason: Optional[BaseException]) -> None:
        with self._cond:
            self._stopping = True
            if reason is not None:
                self._abort_reason = reason
            leftover = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for call in leftover:
            call.set_cancelled()
        self._feeder.join(timeout=10)
        with self._cond:
            generations = list(self._generations)
        try:
            for generation in generations:
                # Joins loky's manager thread, which joins (or first kills) the workers.
                generation.executor.shutdown(wait=True, kill_workers=reason is not None)
        finally:
            for generation in generations:
                generation.table.close()
            shutil.rmtree(self._directory, ignore_errors=True)
            resource_tracker.unregister(self._directory, "folder")


def _broken_pool_state(call: _Call, generation: _Generation, started: int, finished: int) -> State:
    name = call.task_run.name
    dead = generation.dead or {}
    if started in dead:
        how = _describe_exit(dead[started])
        if finished:
            message = (
                f"Task run {name!r} finished in worker process (pid {started}), but the "
                f"worker {how} before its result reached this process; the call was not "
                "run again."
            )
        else:
            message = (
                f"The worker process (pid {started}) running task run {name!r} died "
                f"unexpectedly: it {how}. A segfault, the out-of-memory killer or "
                "os._exit() in the call can cause this."
            )
    elif finished:
        message = (
            f"Task run {name!r} finished in worker process (pid {started}), but its result "
            "was lost when another worker of the pool died unexpectedly "
            f"({generation.cause()}); the call was not run again."
        )
    else:
        message = (
            f"Task run {name!r} was running in worker process (pid {started}) when another "
            f"worker of the pool died unexpectedly ({generation.cause()}); the pool was "
            "stopped with the call unfinished, and the call was not run again."
        )
    return Crashed(message=message, data=TerminatedWorkerError(message))


def _pickling_failure(task_run: TaskRun, run_fn: Callable[..., Any], exc: Exception) -> State:
    try:
        cloudpickle.dumps(run_fn)
    except Exception:
        what = "run_fn"
    else:
        what = "the arguments (run_kwargs)"
    return Crashed(
        message=f"Task run {task_run.name!r} was not started: {what} could not be pickled to "
        f"send to a worker process: {_describe(exc)}. Pass only values that cloudpickle can "
        "serialize, or create the value inside run_fn.",
        data=exc,
    )


class ParallelTaskRunner(BlockingTaskRunner):
    """Runs calls in parallel in loky worker processes.

    :param max_workers: the number of worker processes; None for the number of CPUs
        this process may use
    :param initializer: called as ``initializer(*initargs)`` in each worker process
        when it starts
    :param initargs: the arguments of ``initializer``
    :param env: environment variables to set in the worker processes
    :raises ValueError: if ``max_workers`` is not a positive integer or None, or
        ``env`` is not a mapping of strings to strings
    :raises TypeError: if ``initializer`` is not callable or ``initargs`` not a tuple

    The worker processes belong to the ``start()`` block: created there and stopped
    there. ``run_fn`` and its arguments travel with cloudpickle, so lambdas, closures
    and functions defined in ``__main__`` work; a coroutine ``run_fn`` runs on an event
    loop in the worker. Log records emitted in a call, at or above the root logger's
    level when the block started, reach this process's loggers.

    As in ``concurrent.futures.ProcessPoolExecutor``, a call can be cancelled while it
    waits its turn in this process, and counts as running once it is handed to the
    worker processes, which hold at most ``2 * max_workers + 1`` calls at once, run or
    queued (the size of loky's call queue).

    A worker that dies mid-call gives that call a Crashed state naming the exit code
    or signal; calls that were running in the other workers are Crashed too (saying
    so) and never run twice; calls not started yet run on a fresh pool. A run_fn,
    argument or result that cannot be pickled gives a Crashed state at once.

    >>> from taskrunners.sync import ParallelTaskRunner
    >>> from taskrunners import TaskRun
    >>> from taskrunners.states import Completed
    >>> with ParallelTaskRunner(max_workers=2).start() as runner:
    ...     futures = [runner.submit(TaskRun(), lambda i=i: Completed(data=i * i), {}) for i in range(4)]
    ...     [runner.wait(f).result() for f in futures]
    [0, 1, 4, 9]
    """

    _handles = ("_pool",)

    def __init__(
        self,
        max_workers: Optional[int] = None,
        *,
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Tuple[Any, ...] = (),
        env: Optional[Mapping[str, str]] = None,
    ) -> None:
        if max_workers is not None and (
            not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1
        ):
            raise ValueError(
                f"`max_workers` must be a positive integer or None, got {max_workers!r}."
            )
        if initializer is not None and not callable(initializer):
            raise TypeError(f"`initializer` must be callable or None, got {initializer!r}.")
        if not isinstance(initargs, tuple):
            raise TypeError(
                f"`initargs` must be a tuple, got {type(initargs).__name__}: {initargs!r}."
            )
        if env is not None and (
            not isinstance(env, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ValueError(
                f"`env` must be a mapping of environment variable names to string values, "
                f"got {env!r}."
            )
        self.max_workers = max_workers
        self.initializer = initializer
        self.initargs = initargs
        self.env: Optional[Dict[str, str]] = dict(env) if env is not None else None
        self._pool: Optional[_ProcessPool] = None
        super().__init__()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.PARALLEL

    def _open(self) -> None:
        self._pool = _ProcessPool(
            self.logger,
            self.max_workers or loky.cpu_count(),
            self.initializer,
            self.initargs,
            self.env,
        )

    def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def _abort(self, exc: BaseException) -> None:
        self._cancel_pending()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate(exc)

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> Any:
        pool = self._pool
        if pool is None:
            raise RuntimeError("The task runner must be started before submitting work.")
        return pool.submit(task_run, run_fn, run_kwargs)
