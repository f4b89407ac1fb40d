"""The DaskTaskRunner's batches: many small calls of one task as one Dask task.

How a call travels with ``batch_size="auto"`` (or a fixed size above 1)::

    submit ── its upstream calls all done (or none) ──▶ DaskBatches.submit: an Entry
           for the block's Dispatcher, grouped by task and ``dask.annotate`` values
    dispatcher ── room for one more Dask task ──▶ DaskBatches.send(entries):
           one call:  DaskSubmitter.start, as when it is sent alone (its Dask
                      future, key f"{task_run.name}-{id.hex}", can be handed on)
           several:   client.submit(run_batch_task, payload, key=f"{task}-batch-{hex}")
    worker ── dask_worker.run_batch_task: each call marked started and finished under
           its own token, run to its State and seconds ──▶ encode_batch
    client loop ── StateFetcher ──▶ DaskBatches.settle: each call's State, the task's
           durations (the size of its next batches), then dispatcher.task_done()

Calls that go alone as with ``batch_size=1``: calls handed Dask futures of upstream
calls not done yet (Dask orders them), a task run already in flight as a Dask task
(it shares that task, as ``pure=True`` has it), and calls annotated with Dask
``retries`` (Dask retries a whole task: a batch would run its other calls again).

Hazards, each with its answer:

- The sending thread's annotations. ``dask.annotate`` lives in a context variable,
  and a batch may be sent from any thread: the submitting one (maybe inside another
  call's ``dask.annotate`` block), the client's loop, a waiting one. A Dask task the
  dispatcher sends is submitted in a fresh context with exactly its calls' annotations.
- Cancelling while sending. A batch is submitted holding the ``handover`` lock of
  each of its calls: a call cancelled meanwhile is either left out, or handed to Dask
  with its token, which the workers' registry then keeps from starting.
- A worker dying mid-batch. Dask runs the whole batch again on another worker, up to
  ``distributed.scheduler.allowed-failures`` times, as it does any task it lost: the
  calls of the batch that had run before the death run again. That is Dask's
  documented rule for lost tasks, and the registry that could tell which calls had
  run died with the worker. After the last attempt every call of the batch is
  Crashed with Dask's KilledWorker.
- Adaptive clusters. At most twice the cluster's worker threads in Dask tasks are out
  at once, so ``cluster.adapt()`` sees that many tasks, not every call, when it
  decides how many workers to add; ``batch_size=1`` hands every call to Dask at once.
- Memory. A gathered call holds only what it was submitted with; a batch's calls
  drop its Dask future once settled, so the cluster releases the batch's States.
"""

from __future__ import annotations

import functools
import itertools
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional

import cloudpickle

from taskrunners._collections import visit_collection
from taskrunners._core.arguments import is_future, may_hold_futures
from taskrunners._core.batching import Dispatcher, Durations, Entry, batch_key_of
from taskrunners._core.calls import state_of_done
from taskrunners._core.dask import dask_private, worker as dask_worker
from taskrunners._core.dask.annotations import frozen, submit_annotated, task_name
from taskrunners._core.dask.calls import (
    DaskBatch,
    DaskCall,
    Submission,
    failure_state,
    unpicklable_call_state,
)
from taskrunners._core.dask.scattered import dependencies
from taskrunners._core.dask.submitter import DaskSubmitter
from taskrunners._core.dask.timeouts import forget
from taskrunners._core.limits import Limited
from taskrunners._core.remote.sharing import collecting
from taskrunners._core.remote.protocol import decode_batch
from taskrunners.states import Crashed, State

__all__ = ["DaskBatches"]


class DaskBatches:
    """The runner's batching part: its dispatcher, and sending and settling batches.

    :param submitter: the block's :class:`DaskSubmitter`, which sends a call alone,
        settles one, and watches a batch's Dask future
    :param durations: how long each task's calls take, kept by the runner across blocks
    """

    def __init__(
        self,
        submitter: DaskSubmitter,
        durations: Durations,
    ) -> None:
        import dask

        self.submitter = submitter
        self.client = submitter.client
        self.durations = durations
        self.dispatcher: Dispatcher[Entry[Submission]] = Dispatcher(2, self.send, durations)
        self.refresh_limit()
        self.current_annotations: Callable[[], Dict[str, Any]] = dask.get_annotations
        # One token per call of a batch; unique across runners sharing a worker.
        self._token_prefix = uuid.uuid4().hex
        self._token_numbers = itertools.count()
        # Calls gathered or in a batch, by key: the same task run submitted again
        # follows the call in flight instead of running twice.
        self._in_flight: Dict[str, DaskCall] = {}
        self._owed = threading.local()

    def refresh_limit(self) -> None:
        """At most twice the cluster's worker threads in Dask tasks out at once
        (at least 2): one running and one waiting on each thread."""
        threads = dask_private.total_threads(self.client)
        if threads:
            self.dispatcher.limit = max(2, 2 * threads)

    # -- submitting ------------------------------------------------------------------

    def submit(self, call: DaskCall, submission: Submission) -> None:
        """Hand ``call`` (its upstream calls done) to the dispatcher, or start it alone."""
        entry = self._entry(call, submission)
        if entry is not None:
            self.dispatcher.submit(entry)

    def submit_many(self, calls: List[DaskCall], submissions: List[Submission]) -> None:
        """As :meth:`submit`, for many calls at once (``task.map``)."""
        entries = []
        for call, submission in zip(calls, submissions):
            entry = self._entry(call, submission)
            if entry is not None:
                entries.append(entry)
        self.dispatcher.submit_many(entries)

    def _entry(self, call: DaskCall, submission: Submission) -> Optional[Entry[Submission]]:
        """The dispatcher's entry for ``call``; None if it was started some other way."""
        submitter = self.submitter
        task_run, run_fn, run_kwargs, annotations = submission
        if annotations is None:
            annotations = self.current_annotations()
        key = f"{task_run.name}-{task_run.id.hex}"
        if key in submitter.tokens:  # submitted again while a Dask task of its own: shared
            submitter.start(call, submission, by_value=False)
            return None
        earlier = self._in_flight.get(key)
        if earlier is not None:  # submitted again while gathered or in a batch: run once
            call.waiting_on = [earlier]
            earlier.add_done_callback(lambda done: call.set_result(state_of_done(done)))
            return None
        task = batch_key_of(run_fn, run_kwargs)
        try:
            options = frozen(annotations) if annotations else None
            hash(task)
        except TypeError:
            options = task = None
        if task is None or "retries" in annotations:
            submitter.start(call, submission, by_value=False)
            return None
        call.key = key
        self._in_flight[key] = call
        call.add_done_callback(self._left_flight)
        if submission.annotations is None:  # (not _replace: several times slower)
            submission = Submission(task_run, run_fn, run_kwargs, annotations)
        return Entry(call, task, options, submission)

    def _left_flight(self, call: DaskCall) -> None:
        if self._in_flight.get(call.key or "") is call:
            del self._in_flight[call.key or ""]

    # -- sending ---------------------------------------------------------------------

    def send(self, entries: List[Entry[Submission]]) -> None:
        """The dispatcher's ``send``: one Dask task for ``entries`` (from any thread)."""
        if len(entries) == 1:
            (entry,) = entries
            sent = DaskBatch([entry.call], entry.key, self, single=True)
            if not self.submitter.start(entry.call, entry.item, by_value=True, sent=sent):
                self.task_done()
            return
        self._send_batch(entries)

    def _send_batch(self, entries: List[Entry[Submission]]) -> None:
        live = entries
        while True:
            live = [entry for entry in live if not (entry.call.cancelling or entry.call.done())]
            if not live:
                self.task_done()
                return
            pairs = [(entry.item.run_fn, self._by_value(entry.item.run_kwargs)) for entry in live]
            try:
                with collecting() as collected:
                    calls = cloudpickle.dumps((pairs, None))
            except Exception:
                live = self._picklable(live, pairs)
                continue
            batch = DaskBatch([entry.call for entry in live], live[0].key, self, single=False)
            key = f"{task_name(batch.task)}-batch-{uuid.uuid4().hex}"
            annotations = live[0].item.annotations
            locks = [call.handover for call in batch.calls]
            for lock in locks:
                lock.acquire()
            try:
                if any(call.cancelling or call.done() for call in batch.calls):
                    continue  # cancelled while it was pickled: pickled again without
                prefix, numbers = self._token_prefix, self._token_numbers
                tokens = [f"{prefix}-{next(numbers)}" for _ in batch.calls]
                names = [call.key or "?" for call in batch.calls]
                payload = dask_worker.batch_payload(names, tokens, calls)
                # pure=False: a batch is a new Dask task each time. Its key is fresh
                # anyway; a task run submitted twice is kept to one run before
                # batching (``_in_flight``), not by Dask.
                shared = dependencies(collected)
                for call in batch.calls:  # before Dask may settle them
                    call.shared = collected or None
                submit = functools.partial(
                    self.client.submit,
                    dask_worker.run_batch_task,
                    payload,
                    self.submitter.capture,
                    **({} if shared is None else {"shared": shared}),
                    key=key,
                    pure=False,
                )
                try:
                    dask_future = submit_annotated(annotations, submit, exact=True)
                except Exception as exc:
                    refused: Optional[Exception] = exc
                else:
                    refused = None
                    batch.dask_future = dask_future
                    for position, (call, token) in enumerate(zip(batch.calls, tokens)):
                        call.token, call.dask_future, call.position = token, dask_future, position
            finally:
                for lock in locks:
                    lock.release()
            break
        if refused is not None:
            state = Crashed(message=f"Dask refused the call's batch: {refused!r}.", data=refused)
            for call in batch.calls:
                call.set_result(state)
            self.task_done()
            return
        run_fn = live[0].item.run_fn
        if type(run_fn) is Limited and self.submitter.timeouts is not None:
            batch.expiring = tokens[0]
            self.submitter.timeouts.register(
                list(batch.calls), tokens[0], None, run_fn.seconds, batch, dask_future, live
            )
        self.submitter.watch(batch, dask_future)

    def _by_value(self, run_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if not any(may_hold_futures(value) for value in run_kwargs.values()):
            return run_kwargs
        result: Dict[str, Any] = visit_collection(
            run_kwargs,
            lambda value: self.submitter.by_value(self.submitter.call_of(value))
            if is_future(value)
            else value,
        )
        return result

    def _picklable(self, live: List[Entry[Submission]], pairs: List[Any]) -> List[Entry[Submission]]:
        """The entries whose call pickles; the others are Crashed with the error."""
        kept = []
        for entry, pair in zip(live, pairs):
            try:
                cloudpickle.dumps(pair)
            except Exception as exc:
                entry.call.set_result(unpicklable_call_state(exc))
            else:
                kept.append(entry)
        return kept

    # -- settling (on the client's event loop) ---------------------------------------------

    def settle(self, batch: DaskBatch, value: Any) -> None:
        """What the batch's Dask task returned: each call's State, the task's durations."""
        if batch.settled:
            return
        batch.settled = True
        if batch.expiring is not None:
            forget(batch.expiring)
        try:
            if batch.single:
                seconds = dask_worker.seconds_of(value)
                if seconds:  # None for a State the fetcher made, 0 if it did not start
                    self.durations.record(batch.task, seconds)
                self.submitter.settle_outcome(batch.calls[0], value)
            else:
                self._settle_calls(batch, value)
        finally:
            batch.calls = []
            self.refresh_limit()
            self.task_done()

    def _settle_calls(self, batch: DaskBatch, value: Any) -> None:
        calls = batch.calls
        if isinstance(value, bytes):
            outcomes, records = decode_batch([call.key or "?" for call in calls], value)
            self.submitter.forwarder.forward(records, None)
        elif isinstance(value, State):  # its outcome could not be fetched
            outcomes = [(value, 0.0)] * len(calls)
        else:
            outcomes = value
        ran = [seconds for _, seconds in outcomes if seconds > 0]
        if ran:
            self.durations.record(batch.task, sum(ran), len(ran))
        for call, (state, _) in zip(calls, outcomes):
            # Nothing is handed the batch's Dask future: the cluster may let it go.
            call.dask_future = None
            call.set_result(state)

    def fail(self, batch: DaskBatch, exc: BaseException) -> None:
        """The batch's Dask task raised ``exc`` (cancelled, or its workers died)."""
        if batch.settled:
            return
        batch.settled = True
        if batch.expiring is not None:
            forget(batch.expiring)
        try:
            if batch.single:
                self.submitter.settle_failure(batch.calls[0], exc)
                return
            state = failure_state(exc, in_batch=True)
            for call in batch.calls:
                call.dask_future = None
                call.set_result(state)
        finally:
            batch.calls = []
            self.task_done()

    def abandoned(self, batch: DaskBatch) -> None:
        """The fetcher gave the batch's calls a State of its own: the Dask task is back."""
        if not batch.settled:
            batch.settled = True
            forget(batch.expiring)
            batch.calls = []
            self.task_done()

    def task_done(self) -> None:
        """A Dask task the dispatcher sent is back, or was never sent."""
        # A send that fails calls this from inside the dispatcher's own task_done on
        # this thread; counted and handled in the loop here, so that a run of
        # failing sends does not nest one call deeper each.
        owed = self._owed
        if getattr(owed, "count", None) is not None:
            owed.count += 1
            return
        owed.count = 1
        try:
            while owed.count:
                owed.count -= 1
                self.dispatcher.task_done()
        finally:
            owed.count = None
