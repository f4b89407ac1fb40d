"""How the Ray runner hands calls to Ray and completes them: one Ray task per call
alone or per batch, and what a batch's outcome (or its worker's death) means for
each of its calls.

:class:`RaySender` is the part of :class:`~taskrunners._core.ray.runner.RayTaskRunner`
that one ``start()`` block composes: it owns the block's
:class:`~taskrunners._core.batching.Dispatcher`, the slot table and the
:class:`SenderThread`, and is handed Ray's remote functions and the resource check.
What goes to Ray:

- a call alone whose task is its run_fn goes as ``(run_kwargs, *upstream refs)``:
  its ``ObjectRef`` holds its packed State and duration;
- anything else goes as ``(BatchPayload, *upstream refs)``: its ``ObjectRef`` holds
  every call's State and duration, pickled together, and each call knows its place.
  The upstream refs of all its calls are the task's top-level arguments (one per
  ref), so Ray resolves them; each call names its own by index.

Hazards handled here:

- Worker death inside a batch. Ray only says the task's worker died; the workers of
  this machine mark each call started/finished in a :class:`SlotTable`, read after
  the death (:mod:`~taskrunners._core.ray.outcomes`): calls not started go again,
  those finished whose results were lost are Crashed, and no call starts twice. A
  worker on another machine cannot open the table and marks nothing: then only the
  first call is known to have started, and the others are Crashed, not run again.
- A batch Ray refuses to submit, or whose arguments a worker cannot unpickle, ran no
  call: its calls go again one by one, so only the calls at fault are Crashed.
- Ray's callback threads. A call's completion runs on a Ray thread, and so do the
  callbacks it triggers, downstream submissions among them; submitting from there
  could block the thread that completes Ray's requests, so those go through the
  :class:`SenderThread`, which also completes batches (setting a thousand States
  must not hold up Ray's thread).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import logging
import os
import queue
import tempfile
import threading
import uuid
from typing import Any, Dict, Hashable, List, Optional, Tuple, Union

from taskrunners._core.batching import MAX_CALLS, BatchSize, Dispatcher, Durations, Entry
from taskrunners._core.ray import outcomes as ray_outcomes, ray_private
from taskrunners._core.ray.calls import RayCall, RayEntry, stopped_state
from taskrunners._core.ray.options import ResourceCheck
from taskrunners._core.ray.placed import PutValues, pickled_call
from taskrunners._core.ray.worker import BatchPayload, RemoteFunction, RemoteFunctions, unpacked
from taskrunners._core.limits import Limited, split_limit
from taskrunners._core.remote.protocol import decode_batch
from taskrunners._core.remote.slots import SlotTable
from taskrunners.states import State

__all__ = ["RaySender", "SenderThread"]

#: How many tasks with a time limit a block keeps alive (see ``RaySender._keep``).
_KEPT_LIMITED = 32

# Set while a Ray thread runs our completion callbacks, which must not submit tasks.
_in_ray_callback = threading.local()


class _Sent:
    """One Ray task out, carrying a batch: what its completion needs, and then its result."""

    __slots__ = ("entries", "table", "slots", "result")

    def __init__(
        self, entries: List[RayEntry], table: Optional[SlotTable], slots: Optional[range]
    ) -> None:
        self.entries = entries
        self.table = table
        self.slots = slots
        self.result: Any = None


#: The sender thread's work: a batch to hand to Ray, a batch Ray returned, or None to stop.
_Work = Union[List[RayEntry], _Sent, None]


class SenderThread(threading.Thread):
    """The sender's own thread: hands to Ray the batches that Ray's callback threads
    may not, and completes the batches Ray returned.

    Started with the block, not on first use: at interpreter exit (a RunnerExecutor
    finishing its calls) no new thread can be made.
    """

    def __init__(self, sender: "RaySender", name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._sender = sender
        self._work: "queue.SimpleQueue[_Work]" = queue.SimpleQueue()

    def put(self, work: _Work) -> None:
        self._work.put(work)

    def stop(self) -> None:
        self._work.put(None)

    def run(self) -> None:
        sender = self._sender
        while True:
            work = self._work.get()
            if work is None:  # the block ended
                return
            try:
                if isinstance(work, _Sent):  # a batch Ray returned: settle its calls
                    sender.complete(work)
                else:  # a batch sent from a Ray callback thread: hand it to Ray
                    sender.hand_over(work)
            except Exception:
                logging.getLogger("task_runner.ray").exception("Handing calls to Ray failed.")
            del work  # an idle thread keeps no call alive


class RaySender:
    """Sends the calls of one ``start()`` block to Ray, and completes them.

    :param functions: the block's remote functions (one per task)
    :param resources: checks each call's resource request against the live nodes
    :param limit: how many Ray tasks may be out at once before calls are gathered
    :param batch_size: the runner's ``batch_size``
    :param name: the name of the sender's thread
    """

    def __init__(
        self,
        functions: RemoteFunctions,
        resources: ResourceCheck,
        limit: int,
        batch_size: BatchSize,
        name: str,
    ) -> None:
        self.functions = functions
        self.resources = resources
        self.batch_size = batch_size
        #: Set when the block ends: nothing more is handed to Ray.
        self.closing = False
        #: Where the block's large values are put (see ``ray.placed``), if it shares them.
        self.shared: Optional[PutValues] = None
        self.dispatcher: Dispatcher[RayEntry] = Dispatcher(limit, self._send, Durations(batch_size))
        #: A run of slots for each batch that may be out, twice over (expedited batches
        #: go beyond the limit); a call without a slot is never run again.
        # (With batch_size=1 too: a call with a time limit takes a slot, to be marked
        # timed out in.)
        largest = batch_size if isinstance(batch_size, int) else MAX_CALLS
        self.slots: Optional[SlotTable] = new_slot_table(limit * 2, largest)
        #: The remote options to add for calls with a time limit: a worker that ends at
        #: a limit must not make Ray run the task again.
        self._limited_options = {} if functions.options.get("max_retries", 0) == 0 else {"max_retries": 0}
        # Slots are taken by whichever thread sends a batch.
        self._slots_lock = threading.Lock()
        # The latest tasks with a time limit, kept while the block runs: the next burst
        # of calls with that limit then gets the same Limited run_fn (``with_limit``
        # holds it weakly), so its remote function is not exported again and the
        # durations learned for it still size its batches.
        self._kept: "collections.OrderedDict[Any, None]" = collections.OrderedDict()
        self._thread = SenderThread(self, name)
        self._thread.start()

    def sharing(self) -> bool:
        """Whether the block holds large values now: calls are then pickled here."""
        shared = self.shared
        return shared is not None and len(shared) > 0

    def close(self) -> None:
        """Hand nothing more to Ray; stop the thread and remove the slot table."""
        self.closing = True
        self._kept.clear()
        self._thread.stop()
        table, self.slots = self.slots, None
        if table is not None:
            # Workers that still have it open keep writing to their own mapping.
            table.close()
            for path in [table.path, *glob.glob(glob.escape(table.path) + "-*")]:
                with contextlib.suppress(OSError):  # the table, and files left at limits
                    os.unlink(path)

    def ready(self, entries: List[RayEntry]) -> None:
        """These calls may run now: to the dispatcher, which sends or gathers them."""
        if self.closing:
            for entry in entries:
                entry.call.set_result(stopped_state(entry.call))
        elif len(entries) == 1:
            self.dispatcher.submit(entries[0])
        else:
            self.dispatcher.submit_many(entries)

    # -- handing calls to Ray ------------------------------------------------------------

    def _send(self, batch: List[RayEntry]) -> None:
        """The dispatcher's ``send``: hand ``batch`` to Ray as one task."""
        if getattr(_in_ray_callback, "active", False):
            # Submitting from Ray's own callback thread could block the thread that
            # completes Ray's requests: the sender thread hands it over.
            self._later(batch)
        else:
            self.hand_over(batch)

    def _later(self, work: _Work) -> None:
        if not self.closing:
            self._thread.put(work)

    def hand_over(self, batch: List[RayEntry]) -> None:
        """Submit the calls of ``batch`` to Ray as one task (those not cancelled meanwhile)."""
        dispatcher = self.dispatcher
        live = [entry for entry in batch if entry.call.set_running()]
        if not live or self.closing:
            for entry in live:
                entry.call.set_result(stopped_state(entry.call))
            dispatcher.task_done()
            return
        first = live[0]
        call: RayCall = first.call
        if type(first.key) is Limited:
            self._keep(first.key)
        refused = self.resources.refusal(call.options)
        if refused is not None:
            for entry in live:
                entry.call.set_result(refused)
            dispatcher.task_done()
            return
        try:
            remote = self.functions.get(first.key, call.run_fn)  # type: ignore[arg-type]
        except Exception as exc:  # a run_fn Ray cannot wrap
            for entry in live:
                entry.call.set_result(ray_outcomes.unsubmittable_state(entry.call.task_run.name, exc))
            dispatcher.task_done()
            return
        if (
            len(live) == 1
            and not self.sharing()
            and remote.holds_run_fn
            and call.run_fn is first.key
            and all(held.position is None and not held.large for held in call.held)
            # A call with a time limit needs a slot (see _take_slots).
            and (type(call.run_fn) is not Limited or self.slots is None)
        ):
            self._submit_alone(first, remote)
        else:
            self._submit_batch(live, remote)

    def _submit_alone(self, entry: RayEntry, remote: RemoteFunction) -> None:
        call: RayCall = entry.call
        refs = [held.ref for held in call.held]
        options = call.options
        if self._limited_options and type(call.run_fn) is Limited:
            options = {**options, **self._limited_options}
        try:
            function = remote.function.options(**options) if options else remote.function
            if call.run_kwargs or refs:
                ref = function.remote(call.run_kwargs, *refs)
            else:
                ref = function.remote()
        except Exception as exc:  # a run_fn or arguments Ray cannot serialize, bad options, ...
            call.set_result(ray_outcomes.unsubmittable_state(call.task_run.name, exc))
            self.dispatcher.task_done()
            return
        call.ref, call.position = ref, None
        ray_private.on_ref_done(ref, functools.partial(self._alone_done, call, entry.key))

    def _submit_batch(self, live: List[RayEntry], remote: RemoteFunction) -> None:
        refs: List[Any] = []
        ref_index: Dict[Any, int] = {}
        calls: List[Tuple[Any, Any, Optional[List[Tuple[Any, ...]]]]] = []

        def index_of(ref: Any) -> int:
            index = ref_index.get(ref)
            if index is None:
                index = ref_index[ref] = len(refs)
                refs.append(ref)
            return index

        sharing = self.sharing()
        for entry in live:
            call: RayCall = entry.call
            places: Optional[List[Tuple[Any, ...]]] = None
            if call.held:
                places = []
                for held in call.held:  # one argument per ref, for the whole batch
                    if held.large:  # in a tuple: Ray leaves it to the worker to fetch
                        places.append((index_of((held.ref,)), None, held.ref.hex()))
                    elif held.position is None:
                        places.append((index_of(held.ref), None))
                    else:  # the ref's id: a worker decodes a large batch once
                        places.append((index_of(held.ref), held.position, held.ref.hex()))
            own = remote.holds_run_fn and call.run_fn is entry.key
            run_fn: Any = None if own else call.run_fn
            run_kwargs: Any = call.run_kwargs
            if sharing:
                try:
                    run_fn, run_kwargs = None, pickled_call(run_fn, run_kwargs, index_of)
                except Exception:  # Ray refuses it below, as it would have
                    pass
            calls.append((run_fn, run_kwargs, places))
        table, slots = self._take_slots(len(live), type(live[0].call.run_fn) is Limited)
        payload = BatchPayload(
            [entry.call.task_run.name for entry in live],
            calls,
            table.path if table is not None else None,
            slots,
        )
        options = live[0].call.options
        if self._limited_options and type(live[0].call.run_fn) is Limited:
            options = {**options, **self._limited_options}
        try:
            function = remote.function.options(**options) if options else remote.function
            ref = function.remote(payload, *refs)
        except Exception as exc:
            _give_back(table, slots)
            if len(live) > 1:  # find the calls Ray refuses: each goes alone
                self._resend(live, alone=True)
            else:
                live[0].call.set_result(
                    ray_outcomes.unsubmittable_state(live[0].call.task_run.name, exc)
                )
            self.dispatcher.task_done()
            return
        for position, entry in enumerate(live):
            entry.call.ref, entry.call.position = ref, position
        ray_private.on_ref_done(ref, functools.partial(self._batch_returned, _Sent(live, table, slots)))

    # -- completing what Ray returned ------------------------------------------------------

    def _alone_done(self, call: RayCall, key: Hashable, result: Any) -> None:
        # Runs on a Ray thread: whatever our callbacks submit is handed to another thread.
        dispatcher = self.dispatcher
        _in_ray_callback.active = True
        try:
            if isinstance(result, BaseException):  # run_fns give States, so Ray failed
                dispatcher.task_done()
                call.failed = True
                # A call with a limit goes alone only without a slot table: nothing
                # then tells its limit from a crash.
                limit = split_limit(call.run_fn)[1] if call.run_fn is not None else None
                if limit is not None and ray_outcomes.is_worker_death(result):
                    state = ray_outcomes.maybe_timed_out_state(call.task_run.name, limit, result)
                else:
                    state = ray_outcomes.crash_state(call.task_run.name, result)
            else:
                state, seconds = unpacked(result)
                if self.batch_size == "auto":  # before the next batch is sized
                    dispatcher.durations.record(key, seconds)
                dispatcher.task_done()
            call.set_result(state)
        finally:
            _in_ray_callback.active = False

    def _batch_returned(self, sent: _Sent, result: Any) -> None:
        # On a Ray thread: a thousand States are set on the sender thread instead.
        sent.result = result
        self._later(sent)

    def complete(self, sent: _Sent) -> None:
        """Settle the calls of a batch Ray returned (on the sender thread)."""
        entries, result = sent.entries, sent.result
        if isinstance(result, BaseException):
            self._batch_failed(sent, result)
            return
        names = [entry.call.task_run.name for entry in entries]
        outcomes, _ = decode_batch(names, result)
        self.dispatcher.durations.record(
            entries[0].key, sum(seconds for _, seconds in outcomes), len(outcomes)
        )
        _give_back(sent.table, sent.slots)
        self.dispatcher.task_done()
        for entry, (state, _) in zip(entries, outcomes):
            entry.call.set_result(state)

    def _batch_failed(self, sent: _Sent, exc: BaseException) -> None:
        entries = sent.entries
        names = [entry.call.task_run.name for entry in entries]
        table_open = sent.table is not None and sent.table is self.slots
        states: List[Optional[State]]
        if ray_outcomes.is_worker_death(exc):
            # Read the marks before the slots can be taken again.
            table = sent.table if table_open else None
            marks = ray_outcomes.as_marks(table, sent.slots, len(entries))
            left = ray_outcomes.left_states(table, sent.slots, names)
            limits = [split_limit(entry.call.run_fn)[1] for entry in entries]
            states = ray_outcomes.after_worker_death(names, marks, exc, left, limits)
        elif len(entries) > 1 and ray_outcomes.is_unpickling_failure(exc):
            # The worker could not unpickle the batch's arguments, so no call started:
            # each goes again alone, and only those at fault fail.
            states = [None] * len(entries)
        else:
            states = [ray_outcomes.crash_state(name, exc) for name in names]
        _give_back(sent.table, sent.slots)
        self.dispatcher.task_done()
        again = []
        for entry, state in zip(entries, states):
            if state is None:
                again.append(entry)
            else:
                entry.call.failed = True
                entry.call.set_result(state)
        if again:
            self._resend(again, alone=not ray_outcomes.is_worker_death(exc))

    def _resend(self, entries: List[RayEntry], alone: bool) -> None:
        """Send calls again that never started; ``alone``: each as a Ray task of its own.

        They go at once, whatever is out: they were in Ray already, and somebody may be
        waiting for them (a wait expedites a call once).
        """
        if alone:
            # A group of its own for each: an options key nothing else has.
            entries = [Entry(entry.call, entry.key, object(), None) for entry in entries]
        self.ready(entries)
        for entry in entries:
            self.dispatcher.expedite(entry.call)

    def _keep(self, task: Any) -> None:
        with self._slots_lock:
            kept = self._kept
            kept[task] = None
            kept.move_to_end(task)
            if len(kept) > _KEPT_LIMITED:
                kept.popitem(last=False)

    def _take_slots(
        self, count: int, limited: bool = False
    ) -> Tuple[Optional[SlotTable], Optional[range]]:
        """A slot of the table for each of ``count`` calls of a batch (None: no room)."""
        table = self.slots
        # A call alone is the one running if its worker dies; unless it has a time
        # limit: then its slot tells a limit from a crash.
        if table is None or (count < 2 and not limited):
            return None, None
        with self._slots_lock:
            slots = table.take(count)
        return (table, slots) if slots is not None else (None, None)


def _give_back(table: Optional[SlotTable], slots: Optional[range]) -> None:
    if table is not None and slots is not None:
        table.give_back(slots)


def new_slot_table(runs: int, run_size: int) -> Optional[SlotTable]:
    """A slot table in memory-backed ``/dev/shm`` if there is one, else the temp dir."""
    shm = "/dev/shm"
    directory = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    path = os.path.join(directory, f"taskrunners-ray-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        return SlotTable(path, runs, run_size)
    except OSError:  # no table: a batch's calls are then never run again after a death
        return None
