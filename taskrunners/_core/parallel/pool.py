"""The Parallel runner's process pool: calls gathered into batches, batches run by loky.

The path of a call is drawn in :mod:`~taskrunners._core.parallel.runner`; the worker side
is :mod:`~taskrunners._core.parallel.worker`, the messages of the Crashed states are
in :mod:`~taskrunners._core.parallel.crashes`, one worker in a loky executor of its own
(a generation of one place of this pool) in :mod:`~taskrunners._core.parallel.generation`,
what a batch's outcome means for its calls in :mod:`~taskrunners._core.parallel.outcomes`,
recycling in :mod:`~taskrunners._core.parallel.recycling`.

Hazards this module exists to handle, each with its own State and message:

- A worker dies mid-batch (``os._exit``, a signal, a segfault). loky fails every
  batch its executor holds with ``TerminatedWorkerError`` and kills that executor's
  other workers. So each worker has an executor of its own, and a death costs only
  the batches handed to that worker (at most :data:`PLACES_PER_WORKER`); the other
  workers go on, and the next batch for that place starts a fresh worker. To tell
  the calls of those batches apart, a worker marks each call started, and finished,
  in a slot table (:mod:`~taskrunners._core.remote.slots`), a small file mapped into
  memory by the parent and by every worker of the pool. After a death, per call:
  started and not finished, it is Crashed, naming the worker and how it died;
  finished, its result was lost with the batch (loky sends a batch's results back
  together), so it is Crashed saying so; never started, it is gathered again, for
  another worker. No call runs twice.
- Recycling. A worker that ran ``max_calls_per_worker`` calls (a batch never holds
  more than it may still run), or whose resident memory went above
  ``worker_memory_limit`` after a call (it then starts no other call: those of its
  batches go to another worker), takes no other batch and is replaced once its
  batches are back: nothing is lost or run twice.
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
  dispatcher, where they can be cancelled; each executor holds fewer batches than
  its call queue, which it moves to its worker's queue at once. From the moment
  its batch is sent a call is running and cannot be cancelled, as in
  ProcessPoolExecutor.
- Loky's manager threads. Batches are handed over by a feeder thread, and by an
  executor's manager thread to its own worker in place of each batch it settles,
  one for one. Calls made ready inside a callback on that thread (dependent calls,
  calls to retry after a death) are never submitted from it in a burst: a burst
  would fill its own wake-up pipe and deadlock it.
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
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import loky

from taskrunners._core.batching import MAX_CALLS, BatchSize, Dispatcher, Durations, Sendable, batch_keys_of
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
from taskrunners._core.parallel.recycling import CappedDurations
from taskrunners._core.futures import TaskRun
from taskrunners._core.remote.slots import SlotTable
from taskrunners.states import State, exception_to_crashed_state

__all__ = ["ProcessPool"]

# What became of a batch given a place in a worker.
_SENT, _REQUEUED, _SETTLED = "sent", "requeued", "settled"

#: Batches a worker holds at most: the one it runs, and the next, so that it never
#: waits for this process between two batches.
PLACES_PER_WORKER = 2


class ProcessPool:
    """The worker processes of one ``start()`` block, each replaced alone when it dies.

    Calls go to a :class:`~taskrunners._core.batching.Dispatcher`, which keeps at
    most :data:`PLACES_PER_WORKER` batches out per worker and gathers calls by task
    while that many are out. A batch it sends is pickled at once, then handed to a
    worker's executor: by its manager thread in place of a batch it settled, or by
    the :class:`Feeder`, to the worker holding fewest batches. The feeder is worth
    its cost (see the module's notes; and a caller submitting in a loop would wake a
    manager for every call, starving the workers while it waits for the GIL).
    """

    def __init__(
        self,
        logger: logging.Logger,
        max_workers: int,
        initializer: Optional[Callable[..., Any]],
        initargs: Tuple[Any, ...],
        env: Optional[Dict[str, str]],
        batch_size: BatchSize,
        max_calls_per_worker: Optional[int] = None,
        worker_memory_limit: Optional[int] = None,
    ) -> None:
        self._logger = logger
        self._initializer = initializer
        self._initargs = initargs
        self._env = env
        self._max_calls = max_calls_per_worker
        self._memory_limit = worker_memory_limit
        # Worker records at or above the parent's root level travel back.
        self._log_level = logging.getLogger().level
        self._directory = tempfile.mkdtemp(prefix="taskrunners-parallel-")
        # Removed by loky's resource tracker if this process dies without cleaning up.
        loky_private.track_folder(self._directory)
        self._cond = threading.Condition(threading.Lock())
        # Batches each worker place holds (or that are being handed to it), at most
        # PLACES_PER_WORKER: loky moves each one to its worker's queue at once, so it
        # never holds a call that could still be cancelled (see the module's notes).
        self._load = [0] * max_workers
        capacity = max_workers * PLACES_PER_WORKER
        largest = batch_size if isinstance(batch_size, int) else MAX_CALLS
        durations = Durations(batch_size)
        if max_calls_per_worker is not None:
            largest = min(largest, max_calls_per_worker)
            durations = CappedDurations(batch_size, max_calls_per_worker)
        # A run of slots for each batch out: the table never runs out.
        self._slots = SlotTable(os.path.join(self._directory, "slots"), capacity, largest)
        self._dispatcher: Dispatcher[Sendable[None]] = Dispatcher(capacity, self._send, durations)
        # Batches sent by the dispatcher, pickled, waiting for a place in a worker: only
        # for a moment, or when a caller waits for a gathered call while all are full.
        self._ready: Deque[Batch] = collections.deque()
        self._sending = threading.local()
        self._stopping = False
        self._abort_reason: Optional[BaseException] = None
        self._made = 0
        # The generation in each worker place (its process starts with its first batch),
        # and those replaced whose worker may not have exited yet.
        self._workers = [self._new_generation() for _ in range(max_workers)]
        self._retired: List[Generation] = []
        self._feeder = Feeder(self)
        self._feeder.start()

    def _new_generation(self) -> Generation:
        self._made += 1
        return Generation(
            self._made,
            self._directory,
            self._slots,
            self._max_calls,
            self._memory_limit,
            self._initializer,
            self._initargs,
            self._env,
        )

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
        keys = batch_keys_of(run_fn, run_kwargs_list)  # once per run_fn, not per call
        calls = [
            ParallelCall(task_run, run_fn, run_kwargs, dispatcher, key)
            for task_run, run_kwargs, key in zip(task_runs, run_kwargs_list, keys)
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
                self._cond.notify()
                return
        batch.cancel()

    # -- handing batches to workers (the feeder, and loky's manager threads) ---------

    def next_ready(self) -> Optional[Tuple[Batch, int]]:
        """The next ready batch and the worker place it goes to, once one has room
        (taken); None once stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._ready:
                    index = self._choose(len(self._ready[0].entries))
                    if index is not None:
                        break
                self._cond.wait()
            self._load[index] += 1  # given back if the batch does not get there
            return self._ready.popleft(), index

    def _choose(self, calls: int) -> Optional[int]:
        # With the lock held: the place holding fewest batches that can take ``calls``
        # calls; one that cannot (it retires, or broke) once it holds none, renewed.
        chosen, least = None, PLACES_PER_WORKER
        for index, generation in enumerate(self._workers):
            load = self._load[index]
            if load < least and (load == 0 or generation.takes(calls)):
                chosen, least = index, load
        return chosen

    def place(self, batch: Batch, index: int, manager_of: Optional[Generation] = None) -> None:
        """Hand over a batch that has a place in worker ``index``; freed if not used."""
        try:
            outcome = self._hand_over(batch, index, manager_of)
        except BaseException as exc:  # a bug here must not leave the calls hanging
            self._logger.exception("Handing %d calls to the pool failed.", len(batch.entries))
            crashed = exception_to_crashed_state(exc)
            batch.settle(lambda name: crashed)
            outcome = _SETTLED
        if outcome == _SENT:
            return
        with self._cond:
            self._place_freed(index)
        if outcome == _SETTLED:
            self._dispatcher.task_done()

    def _place_freed(self, index: int) -> None:
        # With the lock held. A worker that takes no other batch is replaced once it
        # holds none; the feeder is woken only when it has a batch to hand over.
        self._load[index] -= 1
        if not self._load[index] and not self._stopping:
            generation = self._workers[index]
            if generation.broken is not None or generation.retiring is not None:
                self._renew(index)
        if self._ready:
            self._cond.notify()

    def _renew(self, index: int) -> Generation:
        # With the lock held, and the place holding no batch: a fresh worker in it.
        old = self._workers[index]
        if old.broken is not None:  # at a call's time limit: not worth a warning
            level = logging.DEBUG if old.timed_out() else logging.WARNING
            self._logger.log(level, "A worker process of the pool died (%s); it is replaced.", old.cause())
        elif old.retiring is not None:
            self._logger.debug("Worker %d of the pool is recycled (%s).", old.number, old.retiring)
        old.retire()
        self._retired = [gone for gone in self._retired if not gone.retired()]
        self._retired.append(old)
        fresh = self._workers[index] = self._new_generation()
        return fresh

    def _hand_over(self, batch: Batch, index: int, manager_of: Optional[Generation]) -> str:
        """Submit ``batch`` to worker ``index``, or settle its calls if it cannot run.

        A worker that cannot take it is replaced first, if it holds no other batch;
        else, as on the manager thread of ``manager_of`` when that one retired, broke
        or was replaced, the batch goes back to the front of the ready queue.
        """
        calls = len(batch.entries)
        for _ in range(MAX_HANDOVERS):
            with self._cond:
                generation: Optional[Generation] = None
                if not self._stopping:
                    generation = self._workers[index]
                    moved = manager_of is not None and manager_of is not generation
                    if moved or not generation.takes(calls):
                        if manager_of is not None or self._load[index] > 1:
                            self._ready.appendleft(batch)
                            return _REQUEUED
                        if generation.broken is not None and self._initializer_failed():
                            generation = None  # a fresh worker would fail the same way
                        else:
                            generation = self._renew(index)
            if generation is None:
                if self._stopping:
                    batch.cancel()
                else:
                    batch.settle(self._initializer_failure)
                return _SETTLED
            try:
                submitted, slots = generation.submit(
                    batch, self._log_level, on_manager=manager_of is not None
                )
            except loky.BrokenProcessPool as exc:
                generation.broke(exc)
                continue  # on a fresh worker
            except Exception as exc:  # e.g. no worker process could be started
                if loky_private.is_shutdown_error(exc):
                    batch.cancel()
                else:
                    batch.settle(functools.partial(handover_failure, exc=exc))
                return _SETTLED
            for entry in batch.entries:
                entry.call.handovers += 1
            submitted.add_done_callback(
                functools.partial(self._on_done, batch, generation, index, slots)
            )
            return _SENT
        cause = self._workers[index].cause()
        batch.settle(functools.partial(every_pool_broke_state, cause=cause))
        return _SETTLED

    # -- outcomes (loky's manager threads) --------------------------------------------

    def _on_done(
        self,
        batch: Batch,
        generation: Generation,
        index: int,
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
            self._next_in_place_of(generation, index)

    def _next_in_place_of(self, generation: Generation, index: int) -> None:
        """A batch of ``generation`` left loky: hand the next ready one over in its place.

        On loky's manager thread, while its worker holds its place and takes batches,
        the next batch is submitted from here: the manager moves it to the worker's
        queue as soon as this callback returns, where handing it to the feeder would
        cost a wake-up of the feeder and one of the manager. One batch per batch
        settled, never a burst (see the module's notes).
        """
        try:
            self._dispatcher.task_done()  # the next batch, if any, joins the ready queue
        except Exception:
            self._logger.exception("Sending the next batch to the pool failed.")
        with self._cond:
            if (
                not self._ready
                or self._stopping
                or generation is not self._workers[index]
                or not generation.takes(len(self._ready[0].entries))
                # The batch came back before the feeder registered this callback,
                # which then ran at once: the feeder goes on by itself.
                or threading.current_thread() is self._feeder
            ):
                self._place_freed(index)
                return
            batch = self._ready.popleft()  # takes over the place
        self.place(batch, index, manager_of=generation)

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
            generations = self._workers + self._retired
        try:
            # All at once: each worker exits while the others do.
            for generation in generations:
                generation.retire(kill_workers=reason is not None)
            for generation in generations:
                generation.join()
        finally:
            self._slots.close()
            shutil.rmtree(self._directory, ignore_errors=True)
            loky_private.untrack_folder(self._directory)
            self._cancel_gathered()  # calls gathered again while the workers stopped

    def _cancel_gathered(self) -> None:
        for entry in self._dispatcher.drop_gathered():
            entry.call.set_cancelled()


class Feeder(threading.Thread):
    """The pool's own thread: hands each ready batch to a worker as soon as one has a
    place for it, until the pool stops (manager threads hand batches over too)."""

    def __init__(self, pool: ProcessPool) -> None:
        super().__init__(name="ParallelTaskRunner-feeder", daemon=True)
        self._pool = pool

    def run(self) -> None:
        pool = self._pool
        while True:
            ready = pool.next_ready()
            if ready is None:
                return
            pool.place(*ready)
            del ready  # the feeder keeps no call alive while it waits
