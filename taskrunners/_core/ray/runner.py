"""The blocking RayTaskRunner: its lifecycle, and how a submitted call becomes ready.

How a call travels: ``submit`` makes a :class:`~taskrunners._core.ray.calls.RayCall`;
once its upstream calls are done, the call is ready and goes to the runner's
:class:`~taskrunners._core.batching.Dispatcher`, which sends it at once while fewer
than four Ray tasks per CPU of the cluster are out, and otherwise gathers it with the
other calls of its task and per-call options, to go as one batch when a task comes
back (or at once, when somebody waits for it). What the dispatcher sends is handed to
Ray as one task of the call's task's remote function
(:mod:`~taskrunners._core.ray.worker`) by the block's
:class:`~taskrunners._core.ray.sending.RaySender`, which owns the dispatcher, completes
what Ray returns on its :class:`~taskrunners._core.ray.sending.SenderThread`, and reads
a worker's death inside a batch (a slot table the workers of this machine mark).

How the runner starts, connects to or joins Ray is
:mod:`~taskrunners._core.ray.connection`; per-call resources are
:mod:`~taskrunners._core.ray.options`; what Ray's failures mean for each call,
:mod:`~taskrunners._core.ray.outcomes`; private Ray names,
:mod:`~taskrunners._core.ray.ray_private`.

Hazards this module handles, each with its own State or error:

- A worker that dies mid-call (``os._exit``, a signal, the OOM killer). Every task is
  submitted with ``max_retries=0`` by default, so the call is Crashed with a message
  naming the cause instead of silently running a second time (inside a batch: see
  :mod:`~taskrunners._core.ray.sending`).
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
- A resource request no live node can meet would wait forever in Ray; such a call is
  Crashed at submit time with a message naming the request and the cluster's largest
  node. Calls with different per-call options never share a batch.
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

import functools
import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType
from taskrunners._core.batching import BatchSize, Dispatcher, check_batch_size
from taskrunners._core.calls import CallHandle, state_of_done, when_all_done
from taskrunners._core.ray import connection as ray_connection, ray_private
from taskrunners._core.ray.calls import Held, RayCall, RayEntry, entry_of, stopped_state
from taskrunners._core.ray.connection import Connection
from taskrunners._core.ray.options import ResourceCheck, call_options, ray_options
from taskrunners._core.ray.sending import RaySender
from taskrunners._core.ray.worker import RemoteFunctions, check_remote_options
from taskrunners._core.remote.protocol import with_upstream
from taskrunners._core.ray.placed import PutValues
from taskrunners._core.remote.snapshots import maybe_large
from taskrunners._core.remote.sharing import DEFAULT_LARGE_VALUE_BYTES, check_large_value_bytes
from taskrunners._core.settings import BATCH_SIZE_DOC, LARGE_VALUE_BYTES_DOC, Setting
from taskrunners._core.futures import TaskRun
from taskrunners.states import exception_to_crashed_state

__all__ = ["RayTaskRunner", "ray_options", "DEFAULT_REMOTE_OPTIONS"]

#: Remote options every call gets unless the runner's ``remote_options`` say otherwise.
DEFAULT_REMOTE_OPTIONS: Mapping[str, Any] = types.MappingProxyType({"max_retries": 0})


# -- the runner ---------------------------------------------------------------------------


class RayTaskRunner(BlockingTaskRunner):
    """Runs calls as Ray tasks, on a local Ray instance or an existing cluster.

    Example (``Completed`` comes from :mod:`taskrunners.states`)::

        with RayTaskRunner(init_kwargs={"num_cpus": 2}).start() as runner:
            future = runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {"x": 21})
            runner.wait(future).result()  # 42

    :param address: a running cluster to join: ``"host:port"`` of its head, or
        ``"ray://host:port"`` (needs ``ray[client]``); None: ``RAY_ADDRESS`` if set, else
        a local Ray instance. A Ray already initialised in this process is joined (an
        ``address`` with another port is refused).
    :param init_kwargs: keyword arguments for ``ray.init`` when the runner starts or
        connects (``namespace`` defaults to ``"prefect"``), not when it joins
    :param remote_options: Ray remote options for every call (``num_cpus``,
        ``runtime_env``, ...); ``max_retries`` defaults to 0, so a call whose worker
        dies is Crashed rather than run twice. Per-call resources: :func:`ray_options`.
    :param batch_size: calls per Ray task: ``"auto"`` gathers calls of one task while
        the workers are busy, as many as take about 0.1 s; a number fixes the size
    :param large_value_bytes: an argument that pickles to this many bytes or more is
        put in Ray's object store once and read from there by every call that takes
        it; None sends it with every call
    :raises TypeError: for an ``address`` that is not a string, ``init_kwargs`` or
        ``remote_options`` that are not dicts, or a key ``ray.init`` does not take,
        naming the closest valid key (checked by ``start()`` if ``ray`` is not imported yet)
    :raises ValueError: for ``address`` in ``init_kwargs``, or a bad ``batch_size``

    ``start()`` starts a local Ray instance on 127.0.0.1 and the block's end shuts it
    down; a cluster or a Ray it joins is left running. Leaving the block with an
    exception does not wait for calls: it shuts down a local instance, or cancels the
    runner's tasks on a cluster. Each call sees its arguments as they were at
    ``submit``; ``taskrunners`` must be importable on the workers. A call whose
    resource request no live node can meet is Crashed at once. A worker that dies
    mid-call gives that call a Crashed state naming the cause; calls in other workers
    go on. Workers are recycled by Ray's own ``max_calls``, through ``remote_options``
    (it counts Ray tasks, and a batch is one). A started runner, pickled and
    unpickled, refuses to submit and wait.

    A call submitted with ``timeout_seconds`` that runs past it (counted from its
    start in the worker) ends its Ray worker process, as a forced ``ray.cancel``
    would: the call is Failed, named "TimedOut"; the calls of its batch that had
    finished keep their States, those not started run again, and Ray never retries
    it (``max_retries=0`` for calls with a limit, whatever ``remote_options`` say).
    Its ``finally`` blocks do not run. On a worker of another machine, which cannot
    open the runner's slot table, the call is Crashed instead, saying that its
    worker ended, perhaps at the limit.
    """

    address: Setting[Optional[str]] = Setting(
        "The cluster to join; None for ``RAY_ADDRESS`` or a local instance."
    )
    init_kwargs: Setting[Dict[str, Any]] = Setting(
        'Keyword arguments for ``ray.init`` (``namespace`` defaults to "prefect").'
    )
    remote_options: Setting[Dict[str, Any]] = Setting(
        "Ray remote options for every call (``max_retries`` defaults to 0)."
    )
    batch_size: Setting[BatchSize] = Setting(BATCH_SIZE_DOC)
    large_value_bytes: Setting[Optional[int]] = Setting(LARGE_VALUE_BYTES_DOC)

    _handles = ("_ray", "_sender", "_shared")
    _snapshots_arguments = True

    def __init__(
        self,
        address: Optional[str] = None,
        init_kwargs: Optional[Dict[str, Any]] = None,
        *,
        remote_options: Optional[Dict[str, Any]] = None,
        batch_size: BatchSize = "auto",
        large_value_bytes: Optional[int] = DEFAULT_LARGE_VALUE_BYTES,
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
        # Against ray.init, imported for that (and checked again at start()).
        ray = ray_connection.ray_for_checks(self._user_init_kwargs)
        if ray is not None:
            ray_connection.check_init_kwargs(ray, self._user_init_kwargs)
        self.init_kwargs = dict(init_kwargs or {})
        self.init_kwargs.setdefault("namespace", "prefect")
        self.remote_options = {**DEFAULT_REMOTE_OPTIONS, **(remote_options or {})}
        self.batch_size = check_batch_size(batch_size)
        self.large_value_bytes = check_large_value_bytes(large_value_bytes)
        #: How this runner holds Ray while started; None when it is not.
        self.connection: Optional[Connection] = None
        self._ray: Any = None
        #: What sends the calls of a started block to Ray; None when not started.
        self._sender: Optional[RaySender] = None
        super().__init__()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.PARALLEL

    # -- lifecycle ---------------------------------------------------------------------

    def _open(self) -> None:
        ray = ray_private.import_ray()
        ray_connection.check_init_kwargs(ray, self._user_init_kwargs)
        check_remote_options(ray, self.remote_options)
        self.connection, context = ray_connection.connect(
            ray, self.address, self.init_kwargs, self._user_init_kwargs, self.logger
        )
        self._ray = ray
        try:
            capacity = ray_connection.describe_cluster(ray, context, self.logger)
        except BaseException:
            self._release()
            raise
        resources = ResourceCheck(
            self.remote_options, capacity, functools.partial(ray_connection.live_nodes, ray)
        )
        # At most four Ray tasks per CPU at a time (every completion travels through
        # this process before the next call goes); the calls beyond wait here, where
        # they can be cancelled and batched.
        limit = max(2, int(4 * sum(node.get("CPU", 0) for node in capacity)))
        self._sender = RaySender(
            RemoteFunctions(ray, self.remote_options),
            resources,
            limit,
            self.batch_size,
            f"{self}-submit",
        )
        if self.large_value_bytes is not None:
            self._shared = self._sender.shared = PutValues(self.large_value_bytes, ray)

    def _close(self) -> None:
        self._release()

    def _abort(self, exc: BaseException) -> None:
        sender = self._sender
        if sender is not None:
            sender.closing = True
            sender.dispatcher.drop_gathered()  # their calls are stopped below, with the others
        refs: Dict[Any, None] = {}
        for call in list(self._pending):
            if isinstance(call, RayCall):
                ref = call.stop()
                if ref is not None:
                    refs[ref] = None
        for ref in refs:  # once per Ray task, not once per call of its batch
            self._cancel_ref(ref)
        self._release()

    def _release(self) -> None:
        connection, self.connection = self.connection, None
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
        self._close_shared()
        ray_connection.disconnect(self._ray, connection)

    # -- submission ----------------------------------------------------------------------

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> RayCall:
        sender = self._sender
        dispatcher = None if sender is None else sender.dispatcher
        call = RayCall(self, dispatcher, task_run, run_fn, run_kwargs, call_options())
        if sender is None or sender.closing:
            call.set_result(stopped_state(call))
        else:
            sender.dispatcher.submit(entry_of(call))  # (one call: without ready()'s list)
        return call

    def _dispatch_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
    ) -> List[CallHandle]:
        options = call_options()
        dispatcher = self._dispatcher()
        calls = [
            RayCall(self, dispatcher, task_run, run_fn, run_kwargs, options)
            for task_run, run_kwargs in zip(task_runs, run_kwargs_list)
        ]
        self._ready([entry_of(call) for call in calls])
        return list(calls)

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> RayCall:
        call = RayCall(self, self._dispatcher(), task_run, run_fn, run_kwargs, call_options())

        def upstream_done() -> None:
            if call.done():  # cancelled while waiting
                return
            try:
                call.run_kwargs, call.held = self._with_upstream_refs(run_kwargs)
            except BaseException as exc:
                call.set_result(exception_to_crashed_state(exc))
                return
            self._ready([entry_of(call)])

        when_all_done(upstream, upstream_done)
        return call

    def _dispatcher(self) -> "Optional[Dispatcher[RayEntry]]":
        sender = self._sender
        return None if sender is None else sender.dispatcher

    def _ready(self, entries: List[RayEntry]) -> None:
        """These calls may run now: to the sender (stopped if the block has ended)."""
        sender = self._sender
        if sender is None:
            for entry in entries:
                entry.call.set_result(stopped_state(entry.call))
        else:
            sender.ready(entries)

    def _with_upstream_refs(self, run_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Held]]:
        """The arguments to send, and where Ray holds the upstream States standing in them.

        Every upstream call is done. One whose Ray task gave its State goes as that
        task's ``ObjectRef`` (the worker reads it from the object store); any other,
        e.g. a task that died or a call of another runner, goes as its State.
        """
        return with_upstream(run_kwargs, self._call_of, state_of_done, self._held_state)

    def _held_state(self, call: CallHandle) -> Optional[Held]:
        """Where Ray holds the State of a call of this runner whose task gave one, else None
        (a call cancelled before it was sent has no task)."""
        if type(call) is RayCall and call.runner is self and call.ref is not None and not call.failed:
            threshold = self.large_value_bytes
            large = (
                call.position is None
                and threshold is not None
                and maybe_large(state_of_done(call).data, threshold)
            )
            return Held(call.ref, call.position, large)
        return None

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


