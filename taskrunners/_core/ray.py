"""The blocking RayTaskRunner: each call is a Ray task, tracked through its ``ObjectRef``.

How a call travels: ``submit`` makes a :class:`_RayCall`; once its upstream calls are
done, the call enters the :class:`_Gate`, which hands it to Ray (``_hand_over``) when
there is room; Ray runs it in a worker (:mod:`~taskrunners._core.ray_worker`) and its
``ObjectRef`` completes the call, with the call's State or a Crashed state naming
what Ray reported. How the runner starts, connects to or joins Ray is
:mod:`~taskrunners._core.ray_connection`; per-call resources are
:mod:`~taskrunners._core.ray_options`; private Ray names are
:mod:`~taskrunners._core.ray_engine`.

Hazards this module handles, each with its own State or error:

- A worker that dies mid-call (``os._exit``, a signal, the OOM killer). Every task is
  submitted with ``max_retries=0`` by default, so the call is Crashed with a message
  naming the cause instead of silently running a second time.
- Dependencies. A call is handed to Ray once its upstream calls are done; upstream
  calls of this runner reach it as ``ObjectRef`` arguments, so their States go from
  the object store to the worker without a trip through this process. An upstream
  task that died has no State in the store: its Crashed State is passed by value.
- Cancelling. Ray cannot tell this process whether a task it was handed has started,
  so, as ``ProcessPoolExecutor`` does with the calls in its call queue, a call counts
  as running once it is handed to Ray, and ``cancel()`` then refuses. The runner hands
  Ray at most two calls per CPU of the cluster at a time; the others wait here, where
  they can still be cancelled.
- A resource request no live node can meet would wait forever in Ray; such a call is
  Crashed at submit time with a message naming the request and the cluster's largest
  node.
- Ray's callback threads. A call's completion runs on a Ray thread, and so do the
  callbacks it triggers, downstream submissions among them; submitting from there
  could block the thread that completes Ray's requests, so those go through a thread
  of the runner's own.
- Leaving the block with an exception. A local instance the runner started is shut
  down, which stops everything; on a cluster it connected to, tasks are force-cancelled
  before it disconnects. On a Ray it joined, a forced cancel is not safe: Ray may hand
  the worker it is killing the next task of this process, which then dies too. There,
  calls not started are dropped and running calls get Ray's KeyboardInterrupt, which
  a coroutine call receives at once (its event loop wakes up regularly for it) and
  plain code at its next Python instruction; a call blocked in C code (a long
  ``time.sleep``) runs on, as a thread would.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import queue
import threading
import types
from typing import Any, Callable, Deque, Dict, List, Mapping, NamedTuple, Optional, Tuple

from taskrunners._core import ray_connection, ray_engine
from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType, state_of_done
from taskrunners._core.batching import BatchSize, check_batch_size
from taskrunners._core.calls import Call, CallHandle, when_all_done
from taskrunners._core.ray_connection import Connection
from taskrunners._core.ray_options import ResourceCheck, call_options, ray_options
from taskrunners._core.ray_worker import RemoteFunctions, check_remote_options, unpacked
from taskrunners._core.remote import with_upstream
from taskrunners.futures import TaskRun
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["RayTaskRunner", "ray_options", "DEFAULT_REMOTE_OPTIONS"]

#: Remote options every call gets unless the runner's ``remote_options`` say otherwise.
DEFAULT_REMOTE_OPTIONS: Mapping[str, Any] = types.MappingProxyType({"max_retries": 0})

# Set while a Ray thread runs our completion callbacks, which must not submit tasks.
_in_ray_callback = threading.local()

# -- one call -------------------------------------------------------------------------------


class _RayTask(NamedTuple):
    """What goes to Ray for one call."""

    run_fn: Callable[..., Any]
    run_kwargs: Dict[str, Any]
    #: The ObjectRefs of upstream calls, passed after ``run_kwargs``.
    refs: List[Any]
    #: The call's own remote options, from :func:`ray_options`.
    options: Mapping[str, Any]


class _RayCall(Call):
    """One call: waits here until the runner hands it to Ray, then follows its ``ObjectRef``."""

    __slots__ = ("runner", "task_run", "ref", "failed")

    def __init__(self, runner: "RayTaskRunner", task_run: TaskRun) -> None:
        super().__init__()
        self.runner = runner
        self.task_run = task_run
        self.ref: Any = None
        # Whether Ray failed the task (the worker died, cancelled, ...): its ref holds no State.
        self.failed = False

    def follow(self, ref: Any) -> None:
        self.ref = ref
        ray_engine.on_ref_done(ref, self._ref_done)

    def _ref_done(self, result: Any) -> None:
        # Runs on a Ray thread: whatever our callbacks submit is handed to another thread.
        _in_ray_callback.active = True
        try:
            gate = self.runner._gate
            if gate is not None:
                gate.release()
            if isinstance(result, BaseException):  # run_fns give States, so Ray failed
                self.failed = True
                result = self.runner._crash_state(self.task_run, result)
            self.set_result(unpacked(result))
        finally:
            _in_ray_callback.active = False

    def stop(self) -> None:
        """Cancel the call, or its Ray task if it was handed to Ray (leaving the block)."""
        if self.cancel() or self.done():
            return
        self.failed = True
        self.runner._cancel_ref(self.ref)
        self.set_result(exception_to_crashed_state(concurrent.futures.CancelledError()))


class _Submitter:
    """A thread of the runner's own that hands calls to Ray for Ray's callback threads.

    Made when the runner starts, not on first use: at interpreter exit (a
    RunnerExecutor finishing its calls) no new ThreadPoolExecutor can be made.
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
                logging.getLogger("task_runner.ray").exception("Handing a call to Ray failed.")
            del fn


class _Gate:
    """Hands calls to Ray while fewer than ``limit`` are in Ray; the others wait in order."""

    def __init__(self, limit: int, send: Callable[[Callable[[], None]], None]) -> None:
        self.limit = limit
        self._send = send
        self._lock = threading.Lock()
        self._in_ray = 0
        self._waiting: Deque[Callable[[], bool]] = collections.deque()

    def enter(self, hand_over: Callable[[], bool]) -> None:
        """Run ``hand_over()`` now if there is room, else when there is.

        ``hand_over`` returns whether it handed a call to Ray (which takes the room).
        """
        with self._lock:
            if self._waiting or self._in_ray >= self.limit:
                self._waiting.append(hand_over)
                return
            self._in_ray += 1
        if not hand_over():
            self.release()

    def release(self) -> None:
        """A call left Ray: hand the next waiting one over."""
        with self._lock:
            self._in_ray -= 1
            if not self._waiting:
                return
            self._in_ray += 1
            hand_over = self._waiting.popleft()
        self._send(self._next(hand_over))

    def _next(self, hand_over: Callable[[], bool]) -> Callable[[], None]:
        def run() -> None:
            if not hand_over():
                self.release()

        return run


# -- the runner ---------------------------------------------------------------------------


class RayTaskRunner(BlockingTaskRunner):
    """Runs each call as a Ray task, on a local Ray instance or an existing cluster.

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
        ``max_retries=n`` if your calls can safely run again. Per-call resources:
        :func:`ray_options`.
    :param batch_size: how many calls one engine task may carry: ``"auto"`` (the
        default) groups the calls of one task while every worker is busy, as many as
        take about a tenth of a second, learned from how long its calls take; ``1``
        sends every call as an engine task of its own; a number fixes the size
    :raises TypeError: for an ``address`` that is not a string, or ``init_kwargs`` or
        ``remote_options`` that are not dicts
    :raises ValueError: for ``address`` given in ``init_kwargs``, or a ``batch_size``
        that is neither "auto" nor a positive integer

    Calls, and the States of upstream futures handed to them, travel with Ray's
    serializer; ``taskrunners`` must be importable on the workers. A call whose
    resource request no live node can meet is Crashed at once rather than waiting.
    Leaving the ``start()`` block with an exception returns without waiting for calls:
    a local instance the runner started is shut down; tasks on a cluster it connected
    to are force-cancelled before it disconnects; on a Ray it joined, calls not started
    are dropped and running ones get Ray's KeyboardInterrupt (a call blocked in C code
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

    _handles = ("_ray", "_remote_functions", "_resources", "_submitter", "_gate")

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
        self._submitter: Optional[_Submitter] = None
        self._gate: Optional[_Gate] = None
        self._closing = False
        super().__init__()

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
        cpus = sum(node.get("CPU", 0) for node in capacity)
        self._gate = _Gate(max(2, int(2 * cpus)), self._submit_later)
        self._submitter = _Submitter(f"{self}-submit")

    def _close(self) -> None:
        self._closing = True
        self._release()

    def _abort(self, exc: BaseException) -> None:
        self._closing = True
        for call in list(self._pending):
            if isinstance(call, _RayCall):
                call.stop()
        self._release()

    def _release(self) -> None:
        connection, self.connection = self.connection, None
        submitter, self._submitter = self._submitter, None
        if submitter is not None:
            submitter.stop()
        self._remote_functions = None
        self._resources = None
        self._gate = None
        ray_connection.disconnect(self._ray, connection)

    # -- submission ----------------------------------------------------------------------

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> _RayCall:
        call = _RayCall(self, task_run)
        self._enter(call, _RayTask(run_fn, run_kwargs, [], call_options()))
        return call

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> _RayCall:
        call = _RayCall(self, task_run)
        options = call_options()

        def upstream_done() -> None:
            if call.done():  # cancelled while waiting
                return
            try:
                sent_kwargs, refs = self._with_upstream_refs(run_kwargs)
            except BaseException as exc:
                call.set_result(exception_to_crashed_state(exc))
                return
            self._enter(call, _RayTask(run_fn, sent_kwargs, refs, options))

        when_all_done(upstream, upstream_done)
        return call

    def _with_upstream_refs(self, run_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Any]]:
        """The arguments to send, and the refs of the upstream calls standing in them.

        Every upstream call is done. One whose ref holds its State goes as that
        ``ObjectRef`` (the worker reads it from the object store); any other, e.g. a
        task that died or a call of another runner, goes as its State.
        """
        return with_upstream(run_kwargs, self._call_of, state_of_done, self._ref_holding_state)

    def _ref_holding_state(self, call: CallHandle) -> Any:
        """The ``ObjectRef`` of a call of this runner whose task gave a State, else None."""
        if type(call) is _RayCall and call.runner is self and not call.failed:
            return call.ref
        return None

    def _enter(self, call: _RayCall, task: _RayTask) -> None:
        """Hand the call to Ray through the gate: now, or once there is room."""
        gate = self._gate
        if gate is None or self._closing:
            call.set_result(_stopped_state(call))
            return
        hand_over = functools.partial(self._hand_over, call, task)
        if getattr(_in_ray_callback, "active", False):
            # Submitting from Ray's own callback thread could block the thread that
            # completes Ray's requests: hand the submission to a thread of ours.
            self._submit_later(functools.partial(gate.enter, hand_over))
        else:
            gate.enter(hand_over)

    def _submit_later(self, fn: Callable[[], None]) -> None:
        submitter = self._submitter
        if submitter is not None and not self._closing:
            submitter.submit(fn)

    def _hand_over(self, call: _RayCall, task: _RayTask) -> bool:
        """Submit the call to Ray; False if it was not (cancelled, refused, stopping)."""
        if not call.set_running():  # cancelled while it waited
            return False
        functions, resources = self._remote_functions, self._resources
        if functions is None or resources is None or self._closing:
            call.set_result(_stopped_state(call))
            return False
        refused = resources.refusal(task.options)
        if refused is not None:
            call.set_result(refused)
            return False
        try:
            remote = functions.get(task.run_fn)
            if task.options:
                remote = remote.options(**task.options)
            if task.run_kwargs or task.refs:
                ref = remote.remote(task.run_kwargs, *task.refs)
            else:
                ref = remote.remote()
        except Exception as exc:  # a run_fn or arguments Ray cannot serialize, bad options, ...
            call.set_result(
                Crashed(
                    # Ray's serialization errors go on for pages: the first line says it.
                    message=f"Ray could not submit the call {call.task_run.name!r}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    data=exc,
                )
            )
            return False
        call.follow(ref)
        return True

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

    def _crash_state(self, task_run: TaskRun, exc: BaseException) -> State:
        """The Crashed state for a call whose Ray task ended in ``exc``, naming the cause."""
        exceptions = ray_engine.import_ray().exceptions
        name = task_run.name
        if isinstance(exc, exceptions.RayTaskError) and exc.cause is not None:
            # Raised in the worker outside run_fn, e.g. a result that cannot be pickled,
            # or (for a dependency) an upstream task that died.
            cause = exc.cause
            if isinstance(cause, exceptions.RayError):
                return self._crash_state(task_run, cause)
            return Crashed(
                message=f"The Ray task of call {name!r} failed outside run_fn: "
                f"{type(cause).__name__}: {cause}",
                data=cause,
            )
        if isinstance(exc, exceptions.TaskCancelledError):
            # The message of every cancelled call, with Ray's error as the data.
            cancelled = exception_to_crashed_state(concurrent.futures.CancelledError())
            return Crashed(message=cancelled.message, data=exc)
        if isinstance(exc, exceptions.OutOfMemoryError):
            return Crashed(
                message=f"Ray killed the worker running call {name!r} because the node ran "
                f"out of memory: {exc}",
                data=exc,
            )
        if isinstance(exc, exceptions.WorkerCrashedError):
            return Crashed(
                message=f"The Ray worker process running call {name!r} died mid-call (killed, "
                "or it exited); the call was not retried (max_retries=0). Ray: "
                f"{type(exc).__name__}: {exc}",
                data=exc,
            )
        if isinstance(exc, exceptions.RayError):
            return Crashed(
                message=f"Ray could not finish call {name!r}: {type(exc).__name__}: {exc}",
                data=exc,
            )
        return exception_to_crashed_state(exc)

    def __setstate__(self, data: Dict[str, Any]) -> None:
        super().__setstate__(data)
        self.connection = None


def _stopped_state(call: _RayCall) -> State:
    error = RuntimeError(
        f"The Ray task runner stopped before call {call.task_run.name!r} could be sent to Ray."
    )
    return Crashed(message=str(error), data=error)
