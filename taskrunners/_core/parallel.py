"""The blocking ParallelTaskRunner: calls in loky worker processes.

How a call travels (the worker side is :mod:`~taskrunners._core.parallel_worker`)::

    submit()           pickles run_fn and its arguments (an error settles the call
       │               at once) and queues a _Call here, where it can be cancelled
       ▼
    feeder thread      once loky holds fewer calls than its call queue's size (or
    (or loky's         loky's manager thread, in place of a call just settled): marks
    manager thread)    the call running, takes a slot in the slot table, submits
       │               run_call() to the current generation's loky executor
       ▼
    loky ──▶ worker    run_call() marks the slot started, runs the call to a State,
       │               pickles it with the call's log records, marks the slot finished
       ▼
    loky's manager     _on_done(): the outcome's records go to this process's
    thread             loggers and its State settles the _Call; after a break, the
                       slot table tells calls that started (Crashed) from calls that
                       never did (queued again, for a fresh generation)

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
import functools
import itertools
import logging
import mmap
import os
import pickle
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

import cloudpickle
import loky

from taskrunners._core import loky_engine
from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType, check_max_workers
from taskrunners._core.batching import BatchSize, check_batch_size
from taskrunners._core.calls import Call
from taskrunners._core.parallel_worker import (
    INITIALIZER_ERROR_FILE,
    SLOT,
    initialize_worker,
    run_call,
)
from taskrunners._core.records import emit
from taskrunners._core.remote import decode_outcome
from taskrunners.futures import TaskRun
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["ParallelTaskRunner"]

# A call that meets this many broken pools before any worker starts it is Crashed
# instead of being handed to yet another pool.
_MAX_HANDOVERS = 3
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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

    def set_result(self, state: State) -> None:
        self.payload = None  # a settled call, cancelled ones too, keeps no argument alive
        super().set_result(state)


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
            file.truncate(slots * SLOT.size)
            self.table = mmap.mmap(file.fileno(), 0)
        self.executor = loky.ProcessPoolExecutor(
            max_workers=max_workers,
            initializer=initialize_worker,
            initargs=(
                os.getpid(),
                os.path.join(directory, INITIALIZER_ERROR_FILE),
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
        # Taken for a place in loky (see _ProcessPool._in_flight), given back when
        # loky is done with the call: never more slots in use than the table has.
        try:
            slot = self._freed.pop()
        except IndexError:
            return next(self._fresh)
        SLOT.pack_into(self.table, slot * SLOT.size, 0, 0)
        return slot

    def give_back(self, slot: int) -> None:
        self._freed.append(slot)

    def marks(self, slot: int) -> Tuple[int, int]:
        """(pid that started the call in ``slot``, pid that finished it), 0 for not yet."""
        return SLOT.unpack_from(self.table, slot * SLOT.size)

    def cause(self) -> str:
        """Which workers died and how, for messages."""
        if self.dead:
            return "; ".join(
                f"worker process (pid {pid}) {_describe_exit(code)}"
                for pid, code in sorted(self.dead.items())
            )
        return loky_engine.break_summary(self.broken)


class _ProcessPool:
    """The worker processes of one ``start()`` block, replaced whole when one dies.

    Calls wait in a queue in this process and are handed to the current loky
    executor, as many at a time as loky's call queue holds: by a feeder thread, and
    by loky's manager thread, which hands over the next call in place of each call it
    settles. Two hazards make the feeder worth its cost. Calls made ready inside a
    callback on loky's manager thread (dependent calls, calls to retry after a break)
    are queued, never submitted from that thread: a burst of them would fill its own
    wake-up pipe and deadlock it (in place of a settled call it submits one, never
    more). And a caller that submits in a loop both pickles (CPU-bound) and would wake
    loky's manager (a syscall) for every call, so the manager would keep waiting for
    the GIL and the workers would starve.
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
        loky_engine.track_folder(self._directory)
        self._cond = threading.Condition(threading.Lock())
        self._queue: Deque[_Call] = collections.deque()
        # Calls handed to loky and not yet settled, at most the size of loky's call
        # queue: loky moves each one to its workers' queue at once, so it never holds
        # a call that could still be cancelled (see the module's notes). More would
        # let very short calls go faster, and leave more calls that cannot be
        # cancelled though they have not started.
        self._in_flight = 0
        self._capacity = loky_engine.call_queue_size(max_workers)
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
            call.set_result(_pickling_failure(task_run, run_fn, exc))
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
                if self._in_flight < self._capacity:  # else the feeder could not take it
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
            self._in_flight += 1  # its place in loky, given back if it does not get there
        self._send(call)
        return True

    def _send(self, call: _Call, manager_of: Optional[_Generation] = None) -> None:
        """Hand over a call that has a place in loky; the place is freed if it is not used."""
        try:
            sent = self._hand_over(call, manager_of)
        except BaseException as exc:  # a bug here must not leave the call hanging
            self._logger.exception("Handing task run %r to the pool failed.", call.task_run.name)
            call.set_result(exception_to_crashed_state(exc))
            sent = False
        if not sent:
            self._free_place()

    def _free_place(self) -> None:
        with self._cond:
            self._place_freed()

    def _place_freed(self) -> None:
        # With the lock held. The feeder is woken only when it has a call to hand over:
        # a wake-up per call costs as much as the rest of the hand-over.
        self._in_flight -= 1
        if self._queue:
            self._cond.notify()

    def _hand_over(self, call: _Call, manager_of: Optional[_Generation]) -> bool:
        """Submit ``call`` to the current executor, or settle it if it cannot run.

        True once loky holds it. On the manager thread of ``manager_of``, it goes to
        that executor or, if that one broke or was replaced, back to the front of the
        queue: only the feeder replaces pools.
        """
        if not call.handovers and not call.set_running():
            return False  # cancelled while queued
        for _ in range(_MAX_HANDOVERS):
            current: Optional[_Generation] = self._generation
            if manager_of is not None and (current is not manager_of or manager_of.broken):
                self._enqueue(call, first=True)
                return False
            if current is not None and current.broken is not None:
                failure = self._initializer_failure(call)
                if failure is not None:  # a fresh pool would fail the same way
                    call.set_result(failure)
                    return False
                current = self._replace(current)
            if current is None or self._stopping:
                call.set_cancelled()
                return False
            generation = current
            slot = generation.take_slot()
            try:
                submitted = generation.executor.submit(
                    run_call,
                    call.payload,
                    call.task_run.name,
                    generation.path,
                    slot,
                    self._log_level,
                )
            except loky.BrokenProcessPool as exc:
                generation.broken = generation.broken or exc
                continue  # on a fresh pool
            except Exception as exc:  # e.g. no worker process could be started
                if loky_engine.is_shutdown_error(exc):
                    call.set_cancelled()
                    return False
                generation.give_back(slot)
                message = (
                    f"Task run {call.task_run.name!r} could not be handed to the worker "
                    f"processes: {_describe(exc)}"
                )
                call.set_result(Crashed(message=message, data=exc))
                return False
            call.handovers += 1
            submitted.add_done_callback(functools.partial(self._on_done, call, generation, slot))
            return True
        message = (
            f"Task run {call.task_run.name!r} could not be handed to the worker processes: "
            f"every new pool broke at once ({self._generation.cause()})."
        )
        call.set_result(Crashed(message=message, data=loky_engine.worker_died_error(message)))
        return False

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
            call.set_result(exception_to_crashed_state(exc))
        finally:
            # No worker writes to the slot any more: either the call came back, or the
            # executor is broken or shut down and takes no other call.
            generation.give_back(slot)
            self._next_in_place_of(generation)

    def _next_in_place_of(self, generation: _Generation) -> None:
        """A call of ``generation`` left loky: hand the next queued call over in its place.

        On loky's manager thread, while its pool is the current one and healthy, the
        next call is submitted from here: the manager moves it to the workers' queue
        as soon as this callback returns, where handing it to the feeder would cost
        a wake-up of the feeder and one of the manager, per call. This is one call
        per call settled, never a burst (see the class notes).
        """
        with self._cond:
            if (
                not self._queue
                or self._stopping
                or generation is not self._generation
                or generation.broken is not None
                # The call came back before the feeder registered this callback,
                # which then ran at once: the feeder goes on by itself.
                or threading.current_thread() is self._feeder
            ):
                self._place_freed()
                return
            call = self._queue.popleft()  # takes over the place
        self._send(call, manager_of=generation)

    def _settle(
        self, call: _Call, generation: _Generation, slot: int, submitted: concurrent.futures.Future
    ) -> None:
        try:
            data = submitted.result(0)
        except BaseException as exc:
            error = exc
        else:
            state, records, _ = decode_outcome(call.task_run.name, data)
            if records:
                emit(records)
            call.set_result(state)
            return
        if loky_engine.is_shutdown_error(error) or self._abort_reason is not None:
            started = generation.marks(slot)[0]
            if started:
                call.set_result(self._stopped_state(call, started))
            else:
                call.set_cancelled()
        elif not isinstance(error, loky.BrokenProcessPool):
            message = (
                f"The process pool could not run task run {call.task_run.name!r}: "
                f"{_describe(error)}"
            )
            call.set_result(Crashed(message=message, data=error))
        else:
            self._after_break(call, generation, slot, error)

    def _after_break(
        self, call: _Call, generation: _Generation, slot: int, error: BaseException
    ) -> None:
        with self._cond:
            generation.broken = generation.broken or error
            if generation.dead is None:
                generation.dead = loky_engine.stopped_workers(generation.executor)
        started, finished = generation.marks(slot)
        if started:
            call.set_result(_broken_pool_state(call, generation, started, finished))
            return
        state = self._never_started_state(call, generation)
        if state is None:
            self._enqueue(call, first=True)  # it was next in line, on a fresh pool
        else:
            call.set_result(state)

    def _initializer_failure(self, call: _Call) -> Optional[State]:
        """A Crashed state if the workers' initializer failed, else None."""
        error_path = os.path.join(self._directory, INITIALIZER_ERROR_FILE)
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
        return Crashed(message=message, data=loky_engine.worker_died_error(message))

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
            loky_engine.untrack_folder(self._directory)


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
    return Crashed(message=message, data=loky_engine.worker_died_error(message))


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
    :param batch_size: how many calls one engine task may carry: ``"auto"`` (the
        default) groups the calls of one task while every worker is busy, as many as
        take about a tenth of a second, learned from how long its calls take; ``1``
        sends every call as an engine task of its own; a number fixes the size
    :raises ValueError: if ``max_workers`` is not a positive integer or None, ``env``
        is not a mapping of strings to strings, or ``batch_size`` is neither "auto" nor
        a positive integer
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
        batch_size: BatchSize = "auto",
    ) -> None:
        check_max_workers(max_workers)
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
        self.batch_size = check_batch_size(batch_size)
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
    ) -> Call:
        pool = self._pool
        if pool is None:
            raise RuntimeError("The task runner must be started before submitting work.")
        return pool.submit(task_run, run_fn, run_kwargs)
