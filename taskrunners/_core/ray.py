"""The blocking RayTaskRunner: calls go to Ray alone or in batches, each one Ray task.

How a call travels: ``submit`` makes a :class:`_RayCall`; once its upstream calls are
done, the call is ready and goes to the runner's
:class:`~taskrunners._core.batching.Dispatcher`, which sends it at once while fewer
than two Ray tasks per CPU of the cluster are out, and otherwise gathers it with the
other calls of its task and per-call options, to go as one batch when a task comes
back (or at once, when somebody waits for it). ``_hand_over`` gives Ray what the
dispatcher sends, as a task of the call's task's remote function
(:mod:`~taskrunners._core.ray_worker`):

- a call alone whose task is its run_fn goes as ``(run_kwargs, *upstream refs)``, as
  before batching: its ``ObjectRef`` holds its packed State and duration;
- anything else goes as ``(BatchPayload, *upstream refs)``: its ``ObjectRef`` holds
  every call's State and duration, pickled together, and each call knows its place.

A call's completion runs on a Ray thread for a call alone, and on a thread of the
runner's own for a batch (setting a thousand States must not hold up Ray's thread).
How the runner starts, connects to or joins Ray is
:mod:`~taskrunners._core.ray_connection`; per-call resources are
:mod:`~taskrunners._core.ray_options`; what Ray's failures mean for each call,
:mod:`~taskrunners._core.ray_outcomes`; private Ray names,
:mod:`~taskrunners._core.ray_engine`.

Hazards this module handles, each with its own State or error:

- A worker that dies mid-call (``os._exit``, a signal, the OOM killer). Every task is
  submitted with ``max_retries=0`` by default, so the call is Crashed with a message
  naming the cause instead of silently running a second time. In a batch, a slot
  table that the workers of this machine mark tells the other calls apart: see
  :mod:`~taskrunners._core.ray_outcomes`.
- Dependencies. A call is ready once its upstream calls are done; upstream calls of
  this runner reach it as ``ObjectRef`` arguments, so their States go from the object
  store to the worker without a trip through this process. An upstream call in a
  batch is found at its place in its batch's outcomes, which its downstream worker
  reads whole. An upstream task that died has no State in the store: its Crashed
  State is passed by value. A finished call's future keeps its batch's outcomes in
  Ray's store, as a call alone keeps its own.
- Cancelling. Ray cannot tell this process whether a task it was handed has started,
  so, as ``ProcessPoolExecutor`` does with the calls in its call queue, a call counts
  as running once it is handed to Ray, and ``cancel()`` then refuses. Calls gathered
  for a batch are not in Ray yet: they can be cancelled.
- One call of a batch that Ray cannot take. A batch Ray refuses to submit, or whose
  arguments a worker cannot unpickle, ran no call: its calls go again one by one, so
  only the calls at fault are Crashed.
- A resource request no live node can meet would wait forever in Ray; such a call is
  Crashed at submit time with a message naming the request and the cluster's largest
  node. Calls with different per-call options never share a batch.
- Ray's callback threads. A call's completion runs on a Ray thread, and so do the
  callbacks it triggers, downstream submissions among them; submitting from there
  could block the thread that completes Ray's requests, so those go through a thread
  of the runner's own.
- Leaving the block with an exception. Gathered calls are cancelled. A local instance
  the runner started is shut down, which stops everything; on a cluster it connected
  to, tasks are force-cancelled before it disconnects. On a Ray it joined, a forced
  cancel is not safe: Ray may hand the worker it is killing the next task of this
  process, which then dies too. There, calls not started are dropped and running
  calls get Ray's KeyboardInterrupt, which a coroutine call receives at once (its
  event loop wakes up regularly for it) and plain code at its next Python
  instruction; a call blocked in C code (a long ``time.sleep``) runs on, as a thread
  would. The calls after it in its batch do not start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import queue
import tempfile
import threading
import types
import uuid
from typing import Any, Callable, Dict, Hashable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from taskrunners._core import ray_connection, ray_engine, ray_outcomes
from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType, state_of_done
from taskrunners._core.batching import (
    MAX_CALLS,
    BatchSize,
    Dispatcher,
    Durations,
    Entry,
    batch_key_of,
    check_batch_size,
)
from taskrunners._core.calls import Call, CallHandle, when_all_done
from taskrunners._core.ray_connection import Connection
from taskrunners._core.ray_options import ResourceCheck, call_options, ray_options
from taskrunners._core.ray_worker import (
    BatchPayload,
    RemoteFunction,
    RemoteFunctions,
    Unbatched,
    check_remote_options,
    unpacked,
)
from taskrunners._core.remote import decode_batch, with_upstream
from taskrunners._core.slots import SlotTable
from taskrunners.futures import TaskRun
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["RayTaskRunner", "ray_options", "DEFAULT_REMOTE_OPTIONS"]

#: Remote options every call gets unless the runner's ``remote_options`` say otherwise.
DEFAULT_REMOTE_OPTIONS: Mapping[str, Any] = types.MappingProxyType({"max_retries": 0})

# Set while a Ray thread runs our completion callbacks, which must not submit tasks.
_in_ray_callback = threading.local()

# -- one call -------------------------------------------------------------------------------


class Held(NamedTuple):
    """Where an upstream call's State is held in Ray: its task's ref, and its place there."""

    ref: Any
    #: Its place among the outcomes of a batch; None for a ref holding one packed State.
    position: Optional[int]


class _RayCall(Call):
    """One call: gathered or waiting here until it is handed to Ray, then in a Ray task.

    Until it is done, it also holds what goes to Ray (a batch whose worker died sends
    its unstarted calls again); then it lets go of it.
    """

    __slots__ = ("runner", "task_run", "run_fn", "run_kwargs", "held", "options", "ref", "position", "failed")

    def __init__(
        self,
        runner: "RayTaskRunner",
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        options: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.runner = runner
        self.task_run = task_run
        self.run_fn: Optional[Callable[..., Any]] = run_fn
        self.run_kwargs: Optional[Dict[str, Any]] = run_kwargs
        #: Where Ray holds the upstream States its ``Upstream(n)`` placeholders stand for.
        self.held: Sequence[Held] = ()
        #: The call's own remote options, from :func:`ray_options`.
        self.options = options
        #: The ref of the Ray task carrying the call, and the call's place in its batch.
        self.ref: Any = None
        self.position: Optional[int] = None
        # Whether Ray failed the task (the worker died, cancelled, ...): its ref holds no State.
        self.failed = False

    def set_result(self, state: State) -> None:
        self.run_fn = self.run_kwargs = None
        self.held = ()
        super().set_result(state)

    def expedite(self) -> None:
        dispatcher = self.runner._dispatcher
        if dispatcher is not None and self._state is None:
            dispatcher.expedite(self)

    def stop(self) -> Any:
        """End the call as cancelled (leaving the block); the ref to cancel in Ray, if any."""
        if self.cancel() or self.done():
            return None
        self.failed = True
        self.set_result(exception_to_crashed_state(concurrent.futures.CancelledError()))
        return self.ref


#: What the dispatcher holds of a call: the call itself holds the rest.
_Entry = Entry[None]


class _Sent:
    """One Ray task out, carrying a batch: what its completion needs."""

    __slots__ = ("dispatcher", "entries", "table", "slots")

    def __init__(
        self,
        dispatcher: "Dispatcher[None]",
        entries: List[_Entry],
        table: Optional[SlotTable],
        slots: Optional[List[int]],
    ) -> None:
        self.dispatcher = dispatcher
        self.entries = entries
        self.table = table
        self.slots = slots


class _RunnerThread:
    """A thread of the runner's own: hands calls to Ray for Ray's callback threads, and
    completes batches.

    Made when the runner starts, not on first use: at interpreter exit (a
    RunnerExecutor finishing its calls) no new thread can be made.
    """

    def __init__(self, name: str) -> None:
        self._queue: "queue.SimpleQueue[Optional[Callable[[], None]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                logging.getLogger("task_runner.ray").exception("Handing calls to Ray failed.")
            del fn


# -- the runner ---------------------------------------------------------------------------


class RayTaskRunner(BlockingTaskRunner):
    """Runs calls as Ray tasks, on a local Ray instance or an existing cluster.

    :param address: a running cluster to join: ``"host:port"`` of its head, or
        ``"ray://host:port"`` (needs ``ray[client]``). None: use ``RAY_ADDRESS`` if set,
        else start a local Ray instance for the ``start()`` block and shut it down after.
        If Ray is already initialised in this process, the runner joins that connection
        and leaves it running (an ``address`` with another port is refused).
    :param init_kwargs: keyword arguments for ``ray.init`` when the runner starts or
        connects (``namespace`` defaults to ``"prefect"``; a local instance gets its
        dashboard, if installed, and its node on 127.0.0.1). Not applied when joining an
        already initialised Ray.
    :param remote_options: Ray remote options for every call (``num_cpus``,
        ``runtime_env``, ``scheduling_strategy``, ...). ``max_retries`` defaults to 0, so
        a call whose worker dies is Crashed and never silently runs twice; pass
        ``max_retries=n`` if your calls can safely run again (Ray then retries a whole
        batch). Per-call resources: :func:`ray_options`.
    :param batch_size: how many calls one Ray task may carry: ``"auto"`` (the default)
        groups the calls of one task while every worker is busy, as many as take about a
        tenth of a second, learned from how long its calls take (calls of a tenth of a
        second or more go alone); ``1`` sends every call as a Ray task of its own; a
        number fixes the size
    :raises TypeError: for an ``address`` that is not a string, or ``init_kwargs`` or
        ``remote_options`` that are not dicts
    :raises ValueError: for ``address`` given in ``init_kwargs``, or a ``batch_size``
        that is neither "auto" nor a positive integer

    Calls, and the States of upstream futures handed to them, travel with Ray's
    serializer; ``taskrunners`` must be importable on the workers. A call whose
    resource request no live node can meet is Crashed at once rather than waiting.
    A batch's calls run one after the other in one worker, each with its own State;
    calls with different :func:`ray_options` never share a batch. Leaving the
    ``start()`` block with an exception returns without waiting for calls: a local
    instance the runner started is shut down; tasks on a cluster it connected to are
    force-cancelled before it disconnects; on a Ray it joined, calls not started are
    dropped and running ones get Ray's KeyboardInterrupt (a call blocked in C code
    runs on, as a thread would). A started runner that is pickled and unpickled cannot
    submit or wait: it raises a RuntimeError mentioning "after serialization".

    >>> from taskrunners.sync import RayTaskRunner
    >>> from taskrunners import TaskRun
    >>> from taskrunners.states import Completed
    >>> def double(x):
    ...     return Completed(data=x * 2)
    >>> with RayTaskRunner(init_kwargs={"num_cpus": 2}).start() as runner:  # doctest: +SKIP
    ...     runner.submit(TaskRun(), double, {"x": 21}).result()
    42
    """

    _handles = (
        "_ray", "_remote_functions", "_resources", "_thread", "_dispatcher", "_slots", "_slots_lock"
    )

    def __init__(
        self,
        address: Optional[str] = None,
        init_kwargs: Optional[Dict[str, Any]] = None,
        *,
        remote_options: Optional[Dict[str, Any]] = None,
        batch_size: BatchSize = "auto",
    ) -> None:
        if address is not None and not isinstance(address, str):
            raise TypeError(
                f"`address` must be a string such as '127.0.0.1:6379' or "
                f"'ray://127.0.0.1:10001', or None; got {address!r}."
            )
        if init_kwargs is not None and not isinstance(init_kwargs, dict):
            raise TypeError(f"`init_kwargs` must be a dict, got {init_kwargs!r}.")
        if init_kwargs and "address" in init_kwargs:
            raise ValueError(
                f"Give the cluster address as `address={init_kwargs['address']!r}`, not "
                "in `init_kwargs`."
            )
        if remote_options is not None and not isinstance(remote_options, dict):
            raise TypeError(f"`remote_options` must be a dict, got {remote_options!r}.")
        self.address = address
        self._user_init_kwargs = dict(init_kwargs or {})
        self.init_kwargs = dict(init_kwargs or {})
        self.init_kwargs.setdefault("namespace", "prefect")
        self.remote_options = {**DEFAULT_REMOTE_OPTIONS, **(remote_options or {})}
        self.batch_size = check_batch_size(batch_size)
        #: How this runner holds Ray while started; None when it is not.
        self.connection: Optional[Connection] = None
        self._ray: Any = None
        self._remote_functions: Optional[RemoteFunctions] = None
        self._resources: Optional[ResourceCheck] = None
        self._thread: Optional[_RunnerThread] = None
        self._dispatcher: Optional[Dispatcher[None]] = None
        self._slots: Optional[SlotTable] = None
        self._closing = False
        super().__init__()

    def _init_bookkeeping(self) -> None:
        super()._init_bookkeeping()
        # Slots are taken by whichever thread sends a batch.
        self._slots_lock = threading.Lock()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.PARALLEL

    # -- lifecycle ---------------------------------------------------------------------

    def _open(self) -> None:
        ray = ray_engine.import_ray()
        check_remote_options(ray, self.remote_options)
        self.connection, context = ray_connection.connect(
            ray, self.address, self.init_kwargs, self._user_init_kwargs, self.logger
        )
        self._ray = ray
        self._closing = False
        self._remote_functions = RemoteFunctions(ray, self.remote_options)
        try:
            capacity = ray_connection.describe_cluster(ray, context, self.logger)
        except BaseException:
            self._release()
            raise
        self._resources = ResourceCheck(
            self.remote_options, capacity, functools.partial(ray_connection.live_nodes, ray)
        )
        # At most two Ray tasks per CPU at a time: enough to keep every worker busy,
        # and the calls beyond wait here, where they can be cancelled and batched.
        limit = max(2, int(2 * sum(node.get("CPU", 0) for node in capacity)))
        dispatcher: Dispatcher[None] = Dispatcher(
            limit, lambda batch: self._send(dispatcher, batch), Durations(self.batch_size)
        )
        self._dispatcher = dispatcher
        if self.batch_size != 1:
            # Room for every call of the batches that may be out, twice over (expedited
            # batches go beyond the limit); a call without a slot is never run again.
            self._slots = _new_slot_table(limit * MAX_CALLS * 2)
        self._thread = _RunnerThread(f"{self}-submit")

    def _close(self) -> None:
        self._closing = True
        self._release()

    def _abort(self, exc: BaseException) -> None:
        self._closing = True
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.drop_gathered()  # their calls are stopped below, with the others
        refs: Dict[Any, None] = {}
        for call in list(self._pending):
            if isinstance(call, _RayCall):
                ref = call.stop()
                if ref is not None:
                    refs[ref] = None
        for ref in refs:  # once per Ray task, not once per call of its batch
            self._cancel_ref(ref)
        self._release()

    def _release(self) -> None:
        connection, self.connection = self.connection, None
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()
        self._remote_functions = None
        self._resources = None
        self._dispatcher = None
        table, self._slots = self._slots, None
        if table is not None:
            # Workers that still have it open keep writing to their own mapping.
            table.close()
            with contextlib.suppress(OSError):
                os.unlink(table.path)
        ray_connection.disconnect(self._ray, connection)

    # -- submission ----------------------------------------------------------------------

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> _RayCall:
        call = _RayCall(self, task_run, run_fn, run_kwargs, call_options())
        dispatcher = self._dispatcher
        if dispatcher is None or self._closing:
            call.set_result(_stopped_state(call))
        else:
            dispatcher.submit(_entry(call))
        return call

    def _dispatch_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
    ) -> List[CallHandle]:
        options = call_options()
        calls = [
            _RayCall(self, task_run, run_fn, run_kwargs, options)
            for task_run, run_kwargs in zip(task_runs, run_kwargs_list)
        ]
        self._ready([_entry(call) for call in calls])
        return list(calls)

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> _RayCall:
        call = _RayCall(self, task_run, run_fn, run_kwargs, call_options())

        def upstream_done() -> None:
            if call.done():  # cancelled while waiting
                return
            try:
                call.run_kwargs, call.held = self._with_upstream_refs(run_kwargs)
            except BaseException as exc:
                call.set_result(exception_to_crashed_state(exc))
                return
            self._ready([_entry(call)])

        when_all_done(upstream, upstream_done)
        return call

    def _with_upstream_refs(self, run_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Held]]:
        """The arguments to send, and where Ray holds the upstream States standing in them.

        Every upstream call is done. One whose Ray task gave its State goes as that
        task's ``ObjectRef`` (the worker reads it from the object store); any other,
        e.g. a task that died or a call of another runner, goes as its State.
        """
        return with_upstream(run_kwargs, self._call_of, state_of_done, self._held_state)

    def _held_state(self, call: CallHandle) -> Optional[Held]:
        """Where Ray holds the State of a call of this runner whose task gave one, else None."""
        if type(call) is _RayCall and call.runner is self and not call.failed:
            return Held(call.ref, call.position)
        return None

    def _ready(self, entries: List[_Entry]) -> None:
        """These calls may run now: to the dispatcher, which sends or gathers them."""
        dispatcher = self._dispatcher
        if dispatcher is None or self._closing:
            for entry in entries:
                entry.call.set_result(_stopped_state(entry.call))
        elif len(entries) == 1:
            dispatcher.submit(entries[0])
        else:
            dispatcher.submit_many(entries)

    def _send(self, dispatcher: "Dispatcher[None]", batch: List[_Entry]) -> None:
        """The dispatcher's ``send``: hand ``batch`` to Ray as one task."""
        if getattr(_in_ray_callback, "active", False):
            # Submitting from Ray's own callback thread could block the thread that
            # completes Ray's requests: hand the submission to a thread of ours.
            self._later(functools.partial(self._hand_over, dispatcher, batch))
        else:
            self._hand_over(dispatcher, batch)

    def _later(self, fn: Callable[[], None]) -> None:
        thread = self._thread
        if thread is not None and not self._closing:
            thread.submit(fn)

    def _hand_over(self, dispatcher: "Dispatcher[None]", batch: List[_Entry]) -> None:
        """Submit the calls of ``batch`` to Ray as one task (those not cancelled meanwhile)."""
        live = [entry for entry in batch if entry.call.set_running()]
        functions, resources = self._remote_functions, self._resources
        if not live or functions is None or resources is None or self._closing:
            for entry in live:
                entry.call.set_result(_stopped_state(entry.call))
            dispatcher.task_done()
            return
        first = live[0]
        call: _RayCall = first.call
        refused = resources.refusal(call.options)
        if refused is not None:
            for entry in live:
                entry.call.set_result(refused)
            dispatcher.task_done()
            return
        try:
            remote = functions.get(first.key, call.run_fn)  # type: ignore[arg-type]
        except Exception as exc:  # a run_fn Ray cannot wrap
            for entry in live:
                entry.call.set_result(ray_outcomes.unsubmittable_state(entry.call.task_run.name, exc))
            dispatcher.task_done()
            return
        if (
            len(live) == 1
            and remote.holds_run_fn
            and call.run_fn is first.key
            and all(held.position is None for held in call.held)
        ):
            self._submit_alone(dispatcher, first, remote)
        else:
            self._submit_batch(dispatcher, live, remote)

    def _submit_alone(
        self, dispatcher: "Dispatcher[None]", entry: _Entry, remote: RemoteFunction
    ) -> None:
        call: _RayCall = entry.call
        refs = [held.ref for held in call.held]
        try:
            function = remote.function.options(**call.options) if call.options else remote.function
            if call.run_kwargs or refs:
                ref = function.remote(call.run_kwargs, *refs)
            else:
                ref = function.remote()
        except Exception as exc:  # a run_fn or arguments Ray cannot serialize, bad options, ...
            call.set_result(ray_outcomes.unsubmittable_state(call.task_run.name, exc))
            dispatcher.task_done()
            return
        call.ref, call.position = ref, None
        ray_engine.on_ref_done(
            ref, functools.partial(self._alone_done, call, dispatcher, entry.key)
        )

    def _alone_done(
        self, call: _RayCall, dispatcher: "Dispatcher[None]", key: Hashable, result: Any
    ) -> None:
        # Runs on a Ray thread: whatever our callbacks submit is handed to another thread.
        _in_ray_callback.active = True
        try:
            if isinstance(result, BaseException):  # run_fns give States, so Ray failed
                dispatcher.task_done()
                call.failed = True
                state = ray_outcomes.crash_state(call.task_run.name, result)
            else:
                state, seconds = unpacked(result)
                if self.batch_size == "auto":  # before the next batch is sized
                    dispatcher.durations.record(key, seconds)
                dispatcher.task_done()
            call.set_result(state)
        finally:
            _in_ray_callback.active = False

    def _submit_batch(
        self,
        dispatcher: "Dispatcher[None]",
        live: List[_Entry],
        remote: RemoteFunction,
    ) -> None:
        refs: List[Any] = []
        ref_index: Dict[Any, int] = {}
        calls: List[Tuple[Any, Any, Optional[List[Tuple[int, Optional[int]]]]]] = []
        for entry in live:
            call: _RayCall = entry.call
            places: Optional[List[Tuple[int, Optional[int]]]] = None
            if call.held:
                places = []
                for held in call.held:  # one argument per ref, for the whole batch
                    index = ref_index.get(held.ref)
                    if index is None:
                        index = ref_index[held.ref] = len(refs)
                        refs.append(held.ref)
                    places.append((index, held.position))
            own = remote.holds_run_fn and call.run_fn is entry.key
            calls.append((None if own else call.run_fn, call.run_kwargs, places))
        table, slots = self._take_slots(len(live))
        payload = BatchPayload(
            [entry.call.task_run.name for entry in live],
            calls,
            table.path if table is not None else None,
            slots,
        )
        options = live[0].call.options
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
            dispatcher.task_done()
            return
        for position, entry in enumerate(live):
            entry.call.ref, entry.call.position = ref, position
        sent = _Sent(dispatcher, live, table, slots)
        ray_engine.on_ref_done(ref, functools.partial(self._batch_returned, sent))

    def _batch_returned(self, sent: _Sent, result: Any) -> None:
        # On a Ray thread: a thousand States are set on a thread of ours instead.
        self._later(functools.partial(self._batch_done, sent, result))

    def _batch_done(self, sent: _Sent, result: Any) -> None:
        entries, dispatcher = sent.entries, sent.dispatcher
        if isinstance(result, BaseException):
            self._batch_failed(sent, result)
            return
        names = [entry.call.task_run.name for entry in entries]
        outcomes, _ = decode_batch(names, result)
        dispatcher.durations.record(
            entries[0].key, sum(seconds for _, seconds in outcomes), len(outcomes)
        )
        _give_back(sent.table, sent.slots)
        dispatcher.task_done()
        for entry, (state, _) in zip(entries, outcomes):
            entry.call.set_result(state)

    def _batch_failed(self, sent: _Sent, exc: BaseException) -> None:
        entries = sent.entries
        names = [entry.call.task_run.name for entry in entries]
        table_open = sent.table is not None and sent.table is self._slots
        states: List[Optional[State]]
        if ray_outcomes.is_worker_death(exc):
            # Read the marks before the slots can be taken again.
            marks = ray_outcomes.as_marks(
                sent.table if table_open else None, sent.slots, len(entries)
            )
            states = ray_outcomes.after_worker_death(names, marks, exc)
        elif len(entries) > 1 and ray_outcomes.is_unpickling_failure(exc):
            # The worker could not unpickle the batch's arguments, so no call started:
            # each goes again alone, and only those at fault fail.
            states = [None] * len(entries)
        else:
            states = [ray_outcomes.crash_state(name, exc) for name in names]
        _give_back(sent.table, sent.slots)
        sent.dispatcher.task_done()
        again = []
        for entry, state in zip(entries, states):
            if state is None:
                again.append(entry)
            else:
                entry.call.failed = True
                entry.call.set_result(state)
        if again:
            self._resend(again, alone=not ray_outcomes.is_worker_death(exc))

    def _resend(self, entries: List[_Entry], alone: bool) -> None:
        """Send calls again that never started; ``alone``: each as a Ray task of its own.

        They go at once, whatever is out: they were in Ray already, and somebody may be
        waiting for them (a wait expedites a call once).
        """
        if alone:
            # A group of its own for each: an options key nothing else has.
            entries = [Entry(entry.call, entry.key, object(), None) for entry in entries]
        self._ready(entries)
        dispatcher = self._dispatcher
        if dispatcher is not None:
            for entry in entries:
                dispatcher.expedite(entry.call)

    def _take_slots(self, count: int) -> Tuple[Optional[SlotTable], Optional[List[int]]]:
        """A slot of the table for each of ``count`` calls of a batch (-1: none left)."""
        table = self._slots
        if table is None or count < 2:  # a call alone is the one running if its worker dies
            return None, None
        with self._slots_lock:
            taken = [table.take() for _ in range(count)]
        return table, [-1 if slot is None else slot for slot in taken]

    def _cancel_ref(self, ref: Any) -> None:
        ray, connection = self._ray, self.connection
        if ray is None or connection is Connection.STARTED or not ray.is_initialized():
            return  # a local instance the runner started goes down with it
        # A forced cancel kills the worker running the task. Ray may meanwhile have
        # handed that worker the next task of this process (its lease is reused), which
        # then dies too: fine when the runner disconnects next, not on a Ray it joined,
        # where the task gets Ray's KeyboardInterrupt instead.
        try:
            ray.cancel(ref, force=connection is Connection.CONNECTED)
        except Exception:  # already finished, or the cluster is gone
            pass

    def __setstate__(self, data: Dict[str, Any]) -> None:
        super().__setstate__(data)
        self.connection = None


def _entry(call: _RayCall) -> _Entry:
    """The dispatcher's entry for a call: grouped by its task and its own options."""
    key = batch_key_of(call.run_fn, call.run_kwargs)  # type: ignore[arg-type]
    try:
        hash(key)
    except TypeError:  # a task that cannot be a key: its calls are never batched
        key = Unbatched(call.run_fn)  # type: ignore[arg-type]
    options = call.options
    group = tuple(sorted((name, repr(value)) for name, value in options.items())) if options else None
    return Entry(call, key, group, None)


def _give_back(table: Optional[SlotTable], slots: Optional[List[int]]) -> None:
    if table is not None and slots is not None:
        for slot in slots:
            if slot >= 0:
                table.give_back(slot)


def _new_slot_table(size: int) -> Optional[SlotTable]:
    """A slot table in memory-backed ``/dev/shm`` if there is one, else the temp dir."""
    shm = "/dev/shm"
    directory = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    path = os.path.join(directory, f"taskrunners-ray-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        return SlotTable(path, size)
    except OSError:  # no table: a batch's calls are then never run again after a death
        return None


def _stopped_state(call: Any) -> State:
    error = RuntimeError(
        f"The Ray task runner stopped before call {call.task_run.name!r} could be sent to Ray."
    )
    return Crashed(message=str(error), data=error)
