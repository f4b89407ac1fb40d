"""The Parallel runner's process pool: calls gathered into batches, batches run by loky.

The path of a call is drawn in :mod:`~taskrunners._core.parallel.runner`; the worker side
is :mod:`~taskrunners._core.parallel.worker`, the messages of the Crashed states are
in :mod:`~taskrunners._core.parallel.crashes`, one loky executor and its slot table
(a generation of this pool) in :mod:`~taskrunners._core.parallel.generation`, what a
batch's outcome means for its calls in :mod:`~taskrunners._core.parallel.outcomes`.

Hazards this module exists to handle, each with its own State and message:

- A worker dies mid-batch (``os._exit``, a signal, a segfault). loky then fails
  every batch it holds with ``TerminatedWorkerError`` and kills the other workers,
  whether their batches had started or not. To tell the calls apart, a worker marks
  each call started, and finished, in a slot table (:mod:`~taskrunners._core.remote.slots`),
  a small file mapped into memory by the parent and by every worker of one pool.
  After a break, per call: started and not finished, it is Crashed, naming the
  worker that died and how; finished, its result was lost with the batch (loky sends
  a batch's results back together), so it is Crashed saying so; never started, it
  is gathered again, for a fresh pool. No call runs twice.
- A value that cannot be pickled. A batch's calls are pickled together in this
  process when the batch is sent; if that fails they are pickled one by one, and
  each one that fails alone is Crashed with its pickling error while the others go
  on. A State that cannot be pickled in the worker fails its call alone (see
  ``remote.encode_batch``). A batch the worker cannot unpickle (a module it cannot
  import) comes back unrun, and its calls are sent again one per batch, so that
  only the call at fault is Crashed.
- Cancelling a call loky holds. loky's shutdown with ``kill_workers`` sets an
  exception on each future it still holds, and fails on one already cancelled: its
  manager thread prints an ``InvalidStateError`` traceback and breaks the pool. So
  loky's futures are never cancelled. Calls wait in this process, gathered by the
  dispatcher, where they can be cancelled; loky holds at most as many batches as
  its call queue, which it moves to its workers' queue at once. From the moment its
  batch is sent a call is running and cannot be cancelled, as in
  ProcessPoolExecutor.
- Loky's manager thread. Batches are handed to loky by a feeder thread, and by
  loky's manager thread in place of each batch it settles, one for one. Calls made
  ready inside a callback on that thread (dependent calls, calls to retry after a
  break) are never submitted from it in a burst: a burst would fill its own wake-up
  pipe and deadlock it.
- Leaving the ``start()`` block with an exception: gathered calls and calls not
  started are cancelled and the workers are killed, without waiting for running
  calls.
- Keeping finished calls alive. A call's State may be large, and its caller's
  future is meant to be the last thing holding it: no queue, thread or callback of
  the pool refers to a call's arguments once it is settled.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import shutil
import tempfile
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import loky

from taskrunners._core.batching import (
    MAX_CALLS,
    BatchSize,
    Dispatcher,
    Durations,
    Sendable,
)
from taskrunners._core.parallel import loky_private
from taskrunners._core.parallel.calls import Batch, ParallelCall, pack
from taskrunners._core.parallel.crashes import (
    every_pool_broke_state,
    handover_failure,
    initializer_failed,
    initializer_failure,
)
from taskrunners._core.parallel.generation import Generation
from taskrunners._core.parallel.outcomes import MAX_HANDOVERS, settle_batch
from taskrunners._core.futures import TaskRun
from taskrunners.states import State, exception_to_crashed_state

__all__ = ["ProcessPool"]

# What became of a batch given a place in loky.
_SENT, _REQUEUED, _SETTLED = "sent", "requeued", "settled"


class ProcessPool:
    """The worker processes of one ``start()`` block, replaced whole when one dies.

    Calls go to a :class:`~taskrunners._core.batching.Dispatcher`, which keeps at
    most as many batches out as loky's call queue holds and gathers calls by task
    while that many are out. A batch it sends is pickled at once, on the thread that
    sends it, then handed to the current loky executor: by loky's manager thread in
    place of a batch it settled, or else by the :class:`Feeder`. Two hazards make the
    feeder worth its cost: see the module's notes on loky's manager thread, and a
    caller that submits in a loop would wake loky's manager (a syscall) for every
    call, so the manager would keep waiting for the GIL and the workers would starve.
    """

    def __init__(
        self,
        logger: logging.Logger,
        max_workers: int,
        initializer: Optional[Callable[..., Any]],
        initargs: Tuple[Any, ...],
        env: Optional[Dict[str, str]],
        batch_size: BatchSize,
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
        loky_private.track_folder(self._directory)
        self._cond = threading.Condition(threading.Lock())
        # Batches loky holds (or that are being handed to it), at most the size of
        # its call queue: loky moves each one to its workers' queue at once, so it
        # never holds a call that could still be cancelled (see the module's notes).
        self._in_flight = 0
        self._capacity = loky_private.call_queue_size(max_workers)
        self._largest_batch = batch_size if isinstance(batch_size, int) else MAX_CALLS
        self._dispatcher: Dispatcher[Sendable[None]] = Dispatcher(
            self._capacity, self._send, Durations(batch_size)
        )
        # Batches sent by the dispatcher, pickled, waiting for a place in loky: only
        # for a moment, or when a caller waits for a gathered call while loky is full.
        self._ready: Deque[Batch] = collections.deque()
        self._sending = threading.local()
        self._stopping = False
        self._abort_reason: Optional[BaseException] = None
        self._generations: List[Generation] = []
        self._generation = self._new_generation()
        self._feeder = Feeder(self)
        self._feeder.start()

    def _new_generation(self) -> Generation:
        generation = Generation(
            len(self._generations),
            self._directory,
            self._max_workers,
            self._capacity,
            self._largest_batch,
            self._initializer,
            self._initargs,
            self._env,
        )
        self._generations.append(generation)
        return generation

    # -- submission (any thread) ------------------------------------------------------

    def submit(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> ParallelCall:
        call = ParallelCall(task_run, run_fn, run_kwargs, self._dispatcher)
        if self._stopping:
            call.set_cancelled()
        else:
            self._dispatcher.submit(call)
        return call

    def submit_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
    ) -> List[ParallelCall]:
        dispatcher = self._dispatcher
        calls = [
            ParallelCall(task_run, run_fn, run_kwargs, dispatcher)
            for task_run, run_kwargs in zip(task_runs, run_kwargs_list)
        ]
        if self._stopping:
            for call in calls:
                call.set_cancelled()
        else:
            dispatcher.submit_many(calls)
        return calls

    # -- sending a batch (the dispatcher's send: any thread) ---------------------------

    def _send(self, entries: List[Sendable[None]]) -> None:
        """Pickle a batch the dispatcher sends, and queue it for a place in loky.

        A batch of which nothing goes out is given back to the dispatcher at once,
        which may send the next one from inside this call: those wait their turn
        here, so that a run of unpicklable calls never recurses deeply.
        """
        sending = self._sending
        pending: Optional[Deque[List[Sendable[None]]]] = getattr(sending, "pending", None)
        if pending is not None:
            pending.append(entries)
            return
        pending = sending.pending = collections.deque([entries])
        try:
            while pending:
                self._send_one(pending.popleft())
        finally:
            sending.pending = None
            for left in pending:  # only if sending raised (a KeyboardInterrupt)
                for entry in left:
                    entry.call.set_cancelled()

    def _send_one(self, entries: List[Sendable[None]]) -> None:
        try:
            batch = pack(entries)
        except BaseException as exc:
            for entry in entries:
                entry.call.set_result(exception_to_crashed_state(exc))
            batch = None
            if not isinstance(exc, Exception):
                self._dispatcher.task_done()
                raise
            self._logger.exception("Sending a batch of %d calls to the pool failed.", len(entries))
        if batch is None:
            self._dispatcher.task_done()  # nothing went out
            return
        with self._cond:
            if not self._stopping:
                self._ready.append(batch)
                if self._in_flight < self._capacity:  # else the feeder could not take it
                    self._cond.notify()
                return
        batch.cancel()

    # -- handing batches to loky (the feeder, and loky's manager thread) ---------------

    def next_ready(self) -> Optional[Batch]:
        """The next ready batch, once loky has a place for it (taken); None once stopping."""
        with self._cond:
            while not (self._stopping or (self._ready and self._in_flight < self._capacity)):
                self._cond.wait()
            if self._stopping:
                return None
            self._in_flight += 1  # its place in loky, given back if it does not get there
            return self._ready.popleft()

    def place(self, batch: Batch, manager_of: Optional[Generation] = None) -> None:
        """Hand over a batch that has a place in loky; the place is freed if it is not used."""
        try:
            outcome = self._hand_over(batch, manager_of)
        except BaseException as exc:  # a bug here must not leave the calls hanging
            self._logger.exception("Handing %d calls to the pool failed.", len(batch.entries))
            crashed = exception_to_crashed_state(exc)
            batch.settle(lambda name: crashed)
            outcome = _SETTLED
        if outcome == _SENT:
            return
        with self._cond:
            self._place_freed()
        if outcome == _SETTLED:
            self._dispatcher.task_done()

    def _place_freed(self) -> None:
        # With the lock held. The feeder is woken only when it has a batch to hand over.
        self._in_flight -= 1
        if self._ready:
            self._cond.notify()

    def _hand_over(self, batch: Batch, manager_of: Optional[Generation]) -> str:
        """Submit ``batch`` to the current executor, or settle its calls if it cannot run.

        On the manager thread of ``manager_of``, it goes to that executor or, if that
        one broke or was replaced, back to the front of the ready queue: only the
        feeder replaces pools.
        """
        for _ in range(MAX_HANDOVERS):
            current: Optional[Generation] = self._generation
            if manager_of is not None and (current is not manager_of or manager_of.broken):
                with self._cond:
                    if not self._stopping:
                        self._ready.appendleft(batch)
                        return _REQUEUED
                batch.cancel()
                return _SETTLED
            if current is not None and current.broken is not None:
                if self._initializer_failed():  # a fresh pool would fail the same way
                    batch.settle(self._initializer_failure)
                    return _SETTLED
                current = self._replace(current)
            if current is None or self._stopping:
                batch.cancel()
                return _SETTLED
            generation = current
            try:
                submitted, slots = generation.submit(
                    batch, self._log_level, on_manager=manager_of is not None
                )
            except loky.BrokenProcessPool as exc:
                generation.broke(exc)
                continue  # on a fresh pool
            except Exception as exc:  # e.g. no worker process could be started
                if loky_private.is_shutdown_error(exc):
                    batch.cancel()
                else:
                    batch.settle(functools.partial(handover_failure, exc=exc))
                return _SETTLED
            for entry in batch.entries:
                entry.call.handovers += 1
            submitted.add_done_callback(functools.partial(self._on_done, batch, generation, slots))
            return _SENT
        cause = self._generation.cause()
        batch.settle(functools.partial(every_pool_broke_state, cause=cause))
        return _SETTLED

    def _replace(self, broken: Generation) -> Optional[Generation]:
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
        self,
        batch: Batch,
        generation: Generation,
        slots: range,
        submitted: concurrent.futures.Future,
    ) -> None:
        try:
            self._settle(batch, generation, slots, submitted)
        except BaseException as exc:  # loky would only log it, and the calls would hang
            self._logger.exception("Settling %d calls failed.", len(batch.entries))
            crashed = exception_to_crashed_state(exc)
            batch.settle(lambda name: crashed)
        finally:
            # No worker writes to these slots any more: either the batch came back,
            # or the executor is broken or shut down and takes no other batch.
            generation.give_back(slots)
            self._next_in_place_of(generation)

    def _next_in_place_of(self, generation: Generation) -> None:
        """A batch of ``generation`` left loky: hand the next ready one over in its place.

        On loky's manager thread, while its pool is the current one and healthy, the
        next batch is submitted from here: the manager moves it to the workers' queue
        as soon as this callback returns, where handing it to the feeder would cost a
        wake-up of the feeder and one of the manager. One batch per batch settled,
        never a burst (see the module's notes).
        """
        try:
            self._dispatcher.task_done()  # the next batch, if any, joins the ready queue
        except Exception:
            self._logger.exception("Sending the next batch to the pool failed.")
        with self._cond:
            if (
                not self._ready
                or self._stopping
                or generation is not self._generation
                or generation.broken is not None
                # The batch came back before the feeder registered this callback,
                # which then ran at once: the feeder goes on by itself.
                or threading.current_thread() is self._feeder
            ):
                self._place_freed()
                return
            batch = self._ready.popleft()  # takes over the place
        self.place(batch, manager_of=generation)

    def _settle(
        self,
        batch: Batch,
        generation: Generation,
        slots: range,
        submitted: concurrent.futures.Future,
    ) -> None:
        again = settle_batch(
            batch,
            generation,
            slots,
            submitted,
            self._dispatcher.durations,
            self._abort_reason,
            self._directory,
        )
        if again:
            self._dispatcher.submit_many(again)

    def _initializer_failed(self) -> bool:
        return initializer_failed(self._directory)

    def _initializer_failure(self, name: str) -> State:
        return initializer_failure(self._directory, name)

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
            leftover = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        self._cancel_gathered()
        for batch in leftover:
            batch.cancel()
        self._feeder.join(timeout=10)
        with self._cond:
            generations = list(self._generations)
        try:
            for generation in generations:
                generation.shutdown(kill_workers=reason is not None)
        finally:
            for generation in generations:
                generation.close()
            shutil.rmtree(self._directory, ignore_errors=True)
            loky_private.untrack_folder(self._directory)
            self._cancel_gathered()  # calls gathered again while the workers stopped

    def _cancel_gathered(self) -> None:
        for entry in self._dispatcher.drop_gathered():
            entry.call.set_cancelled()


class Feeder(threading.Thread):
    """The pool's own thread: hands each ready batch to loky as soon as loky has a
    place for it, until the pool stops (loky's manager thread also hands batches
    over, one in place of each batch it settles)."""

    def __init__(self, pool: ProcessPool) -> None:
        super().__init__(name="ParallelTaskRunner-feeder", daemon=True)
        self._pool = pool

    def run(self) -> None:
        pool = self._pool
        while True:
            batch = pool.next_ready()
            if batch is None:
                return
            pool.place(batch)
            del batch  # the feeder keeps no call alive while it waits
