"""The blocking RayTaskRunner: each call is a Ray task, tracked through its ``ObjectRef``.

Hazards this module handles, each with its own State or error:

- Starting versus joining. With no address, and Ray not initialised in this process,
  the runner starts a local Ray instance (``ray.init(address="local")``, so a stale
  ``/tmp/ray/ray_current_cluster`` of an old ``ray start`` is never picked up) and
  shuts it down on exit. With an address (or ``RAY_ADDRESS``) it connects and only
  disconnects on exit; when Ray is already initialised it joins that connection and
  leaves it alone.
- Token authentication (Ray 2.60 turns it on for local instances, and
  ``ray start --head`` turns it on when a token exists). Ray itself only sends its
  token to clusters it finds on its own, so connecting to an explicit address of a
  token-protected head would fail after a long retry loop; the runner sends the token
  whenever one is available (a cluster without authentication ignores it).
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

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import ipaddress
import logging
import os
import queue
import threading
import types
import weakref
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Tuple

from taskrunners._collections import visit_collection
from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType, state_of_done
from taskrunners._core.calls import Call, when_all_done
from taskrunners._core.running import arun_to_state, is_coroutine_function, run_to_state
from taskrunners.futures import PrefectFuture, TaskRun
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["RayTaskRunner", "ray_options"]

#: Remote options every call gets unless the runner's ``remote_options`` say otherwise.
DEFAULT_REMOTE_OPTIONS: Mapping[str, Any] = types.MappingProxyType({"max_retries": 0})

# Only one Ray connection exists per process: starting runners must not race for it.
_CONNECT_LOCK = threading.Lock()

# Set while a Ray thread runs our completion callbacks, which must not submit tasks.
_in_ray_callback = threading.local()

_call_options: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "taskrunners_ray_options", default=types.MappingProxyType({})
)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("Using the `RayTaskRunner` requires `ray` to be installed.") from exc
    return ray


# -- per-call options ------------------------------------------------------------------


def _check_amount(name: str, value: Any, integer: bool = False) -> None:
    allowed = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


@contextlib.contextmanager
def ray_options(
    *,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    memory: Optional[int] = None,
    resources: Optional[Mapping[str, float]] = None,
) -> Iterator[Mapping[str, Any]]:
    """Ray resources for the calls submitted to a :class:`RayTaskRunner` inside the block.

    Options given here override the runner's ``remote_options`` for those calls; nested
    blocks override outer ones, and their ``resources`` are merged. The options follow
    the submitting thread or async task (a context variable), so concurrent tasks can
    use different options.

    :param num_cpus: CPUs each call reserves (Ray's default for a task is 1)
    :param num_gpus: GPUs each call reserves
    :param memory: bytes of memory each call reserves
    :param resources: custom resources each call reserves, e.g. ``{"accelerator": 1}``
    :return: the options in force inside the block
    :raises ValueError: for a negative or non-numeric amount, or for ``CPU``, ``GPU``
        or ``memory`` given in ``resources`` instead of their own arguments

    >>> from taskrunners.sync import RayTaskRunner
    >>> with RayTaskRunner().start() as runner:  # doctest: +SKIP
    ...     with ray_options(num_cpus=2, resources={"big-memory": 1}):
    ...         future = runner.submit(TaskRun(), train, {"epochs": 3})
    """
    given: Dict[str, Any] = {}
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None:
            _check_amount(name, value)
            given[name] = value
    if memory is not None:
        _check_amount("memory", memory, integer=True)
        given["memory"] = memory
    outer = _call_options.get()
    if resources is not None:
        if not isinstance(resources, Mapping):
            raise TypeError(
                f"`resources` must be a mapping of resource name to amount, got {resources!r}."
            )
        for key, value in resources.items():
            if not isinstance(key, str):
                raise TypeError(f"Resource names in `resources` must be strings, got {key!r}.")
            if key in ("CPU", "GPU", "memory"):
                argument = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}[key]
                raise ValueError(
                    f"Give {key!r} as `{argument}=`, not in `resources` ({dict(resources)!r})."
                )
            _check_amount(f"resources[{key!r}]", value)
        given["resources"] = {**outer.get("resources", {}), **resources}
    token = _call_options.set(types.MappingProxyType({**outer, **given}))
    try:
        yield _call_options.get()
    finally:
        _call_options.reset(token)


def _requested_resources(options: Mapping[str, Any]) -> Dict[str, float]:
    """What one task with these remote options needs from a single node."""
    request = {
        "CPU": options.get("num_cpus", 1),
        "GPU": options.get("num_gpus", 0),
        "memory": options.get("memory", 0),
        **(options.get("resources") or {}),
    }
    return {name: amount for name, amount in request.items() if amount}


# -- inside the worker -------------------------------------------------------------------


class _UpstreamSlot:
    """Stands in the arguments for the State of the upstream call passed as the n-th ref."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_UpstreamSlot, (self.index,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UpstreamSlot) and other.index == self.index

    def __hash__(self) -> int:
        return hash((_UpstreamSlot, self.index))


def _packed(state: State) -> Any:
    # A State travels through Ray as a plain tuple: Ray pickles a State several times
    # slower than a tuple, which shows on calls that do little.
    if type(state) is State:
        return (state.type.value, state.name, state.message, state.data)
    return state


def _unpacked(value: Any) -> Any:
    if type(value) is tuple:
        return State(value[0], name=value[1], message=value[2], data=value[3])
    return value


def _run_in_worker(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], upstream: tuple) -> Any:
    if upstream:
        states = [_unpacked(value) for value in upstream]
        run_kwargs = visit_collection(
            run_kwargs,
            lambda value: states[value.index] if isinstance(value, _UpstreamSlot) else value,
        )
    if is_coroutine_function(run_fn):
        return _packed(_run_coroutine(run_fn, run_kwargs))
    return _packed(run_to_state(run_fn, run_kwargs))


# How often a coroutine call's event loop wakes up to take Ray's KeyboardInterrupt.
_INTERRUPT_CHECK_SECONDS = 0.1


def _run_coroutine(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]) -> State:
    # Ray cancels a running task by raising KeyboardInterrupt at the worker's next
    # Python instruction; an event loop asleep in select() would not run one until its
    # next timer, so it is woken up regularly.
    async def main() -> State:
        loop = asyncio.get_running_loop()
        wake = [None]

        def tick() -> None:
            wake[0] = loop.call_later(_INTERRUPT_CHECK_SECONDS, tick)

        tick()
        try:
            return await arun_to_state(run_fn, run_kwargs)
        finally:
            wake[0].cancel()

    try:
        return asyncio.run(main())
    except BaseException as exc:
        return exception_to_crashed_state(exc)


def _outcome(future: concurrent.futures.Future) -> Any:
    try:
        return future.result()
    except BaseException as exc:
        return exc


class _RunFnHolder:
    """Holds a run_fn for its remote function: weakly in this process, strongly once pickled.

    The remote function must not keep its run_fn alive here, or the cache of remote
    functions, keyed weakly by run_fn, would never let go of either.
    """

    __slots__ = ("_weak", "_strong")

    def __init__(self, run_fn: Callable[..., Any], weak: bool = True) -> None:
        self._weak: Any = None
        self._strong: Any = run_fn
        if weak:
            with contextlib.suppress(TypeError):  # not weak-referenceable: held strongly
                self._weak, self._strong = weakref.ref(run_fn), None

    def get(self) -> Callable[..., Any]:
        run_fn = self._strong if self._weak is None else self._weak()
        if run_fn is None:
            raise RuntimeError("The run_fn of this remote function was garbage-collected.")
        return run_fn

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_RunFnHolder, (self.get(), False))


def _remote_function(ray: Any, run_fn: Callable[..., Any], options: Mapping[str, Any]) -> Any:
    holder = _RunFnHolder(run_fn)

    def run_call(*arguments: Any) -> Any:
        # (run_kwargs, *upstream States), or nothing at all for a call without arguments.
        run_kwargs = arguments[0] if arguments else {}
        return _run_in_worker(holder.get(), run_kwargs, arguments[1:])

    # Ray names tasks after the function: show the run_fn's name in its dashboard.
    name = getattr(run_fn, "__name__", None) or type(run_fn).__name__
    run_call.__name__ = run_call.__qualname__ = name
    return ray.remote(**options)(run_call)


class _RemoteFunctions:
    """Ray remote functions by run_fn identity, held as long as the run_fn lives.

    Exporting a remote function costs a round trip to the cluster, so each run_fn is
    wrapped and exported once, not once per call.
    """

    def __init__(self, make: Callable[[Callable[..., Any]], Any]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._entries: Dict[int, Tuple[Any, Any]] = {}

    def get(self, run_fn: Callable[..., Any]) -> Any:
        key = id(run_fn)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is run_fn:
            return entry[1]
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is run_fn:
                return entry[1]
            remote = self._make(run_fn)
            try:
                alive = weakref.ref(run_fn, lambda dead, key=key: self._forget(key, dead))
            except TypeError:  # not weak-referenceable: wrapped anew for every call
                return remote
            self._entries[key] = (alive, remote)
            return remote

    def _forget(self, key: int, dead: Any) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is dead:
            self._entries.pop(key, None)


# -- the handle on one call ----------------------------------------------------------------


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
        on_completed = getattr(ref, "_on_completed", None)
        if on_completed is not None:
            # What ObjectRef.future() builds on, without a second Future per call.
            on_completed(self._ref_done)
        else:
            ref.future().add_done_callback(lambda done: self._ref_done(_outcome(done)))

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
            self.set_result(_unpacked(result))
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
    :raises TypeError: for an ``address`` that is not a string, or ``init_kwargs`` or
        ``remote_options`` that are not dicts
    :raises ValueError: for ``address`` given in ``init_kwargs``

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

    _handles = (
        "_ray", "_remote_functions", "_capacity", "_fitting_requests", "_submitter", "_gate"
    )

    def __init__(
        self,
        address: Optional[str] = None,
        init_kwargs: Optional[Dict[str, Any]] = None,
        *,
        remote_options: Optional[Dict[str, Any]] = None,
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
        # How this runner holds Ray while started: "started", "connected" or "joined".
        self.connection: Optional[str] = None
        self._ray: Any = None
        self._remote_functions: Optional[_RemoteFunctions] = None
        self._capacity: Optional[List[Dict[str, float]]] = None
        self._fitting_requests: Optional[set] = None
        self._submitter: Optional[_Submitter] = None
        self._gate: Optional[_Gate] = None
        self._closing = False
        super().__init__()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.PARALLEL

    # -- lifecycle ---------------------------------------------------------------------

    def _open(self) -> None:
        ray = _import_ray()
        try:
            ray.remote(**self.remote_options)(_run_in_worker)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Ray refused `remote_options={self.remote_options!r}`: {exc}") from exc
        with _CONNECT_LOCK:
            context = self._connect(ray)
        self._ray = ray
        self._closing = False
        options = self.remote_options
        self._remote_functions = _RemoteFunctions(lambda fn: _remote_function(ray, fn, options))
        self._fitting_requests = set()
        try:
            self._describe_cluster(ray, context)
        except BaseException:
            self._release()
            raise
        cpus = sum(node.get("CPU", 0) for node in self._capacity or [])
        self._gate = _Gate(max(2, int(2 * cpus)), self._submit_later)
        self._submitter = _Submitter(f"{self}-submit")

    def _connect(self, ray: Any) -> Any:
        if ray.is_initialized():
            self._check_joined_address(ray)
            self.logger.info("Joining the Ray instance this process is already connected to")
            if self._user_init_kwargs:
                self.logger.warning(
                    "Ray is already initialised in this process: `init_kwargs` %r are not "
                    "applied.",
                    self._user_init_kwargs,
                )
            self.connection = "joined"
            return None
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address and address not in ("local",):
            self.logger.info(f"Connecting to an existing Ray instance at {address}")
            _send_token_if_available()
            try:
                with _single_machine_mode(_host_of(address)):
                    context = ray.init(address=address, **self.init_kwargs)
            except ImportError as exc:
                raise RuntimeError(
                    f"Connecting to `address={address!r}` needs Ray's client extra: "
                    "pip install 'ray[client]'."
                ) from exc
            self.connection = "connected"
            return context
        self.logger.info("Creating a local Ray instance")
        init_kwargs = {"dashboard_host": "127.0.0.1", "_node_ip_address": "127.0.0.1"}
        init_kwargs.update(self.init_kwargs)
        with _single_machine_mode(init_kwargs["_node_ip_address"]):
            context = ray.init(address="local", **init_kwargs)
        self.connection = "started"
        return context

    def _check_joined_address(self, ray: Any) -> None:
        wanted = _port_of(self.address)
        if wanted is None:
            return
        try:
            current = ray.get_runtime_context().gcs_address
        except Exception:  # a Ray client connection knows no GCS address
            return
        if _port_of(current) not in (None, wanted):
            raise RuntimeError(
                f"This process is already connected to the Ray cluster at {current}, not "
                f"`address={self.address!r}`: call `ray.shutdown()` first, or leave "
                "`address` out to use the current connection."
            )

    def _describe_cluster(self, ray: Any, context: Any) -> None:
        nodes = [node for node in ray.nodes() if node.get("Alive") or node.get("alive")]
        self._capacity = [dict(node.get("Resources") or {}) for node in nodes]
        self.logger.info(f"Using Ray cluster with {len(nodes)} nodes.")
        url = getattr(context, "dashboard_url", None) if context is not None else None
        if context is None:
            try:
                from ray._private.worker import get_dashboard_url

                url = get_dashboard_url()
            except Exception:
                url = None
        if url:
            if "://" not in url:
                url = f"http://{url}"
            self.logger.info(f"The Ray UI is available at {url}")

    def _close(self) -> None:
        self._closing = True
        self._release()

    def _abort(self, exc: BaseException) -> None:
        self._closing = True
        for call in list(self._pending):
            call.stop()
        self._release()

    def _release(self) -> None:
        ray, connection = self._ray, self.connection
        submitter, self._submitter = self._submitter, None
        if submitter is not None:
            submitter.stop()
        self._remote_functions = None
        self._capacity = None
        self._gate = None
        self.connection = None
        if ray is not None and connection in ("started", "connected"):
            with _CONNECT_LOCK:
                # A runner that started Ray stops it; one that connected only disconnects.
                ray.shutdown()

    # -- submission ----------------------------------------------------------------------

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> _RayCall:
        call = _RayCall(self, task_run)
        self._enter(call, run_fn, run_kwargs, [], _call_options.get())
        return call

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> _RayCall:
        call = _RayCall(self, task_run)
        options = _call_options.get()

        def upstream_done() -> None:
            if call.done():  # cancelled while waiting
                return
            try:
                sent_kwargs, refs = self._with_upstream_refs(run_kwargs)
            except BaseException as exc:
                call.set_result(exception_to_crashed_state(exc))
                return
            self._enter(call, run_fn, sent_kwargs, refs, options)

        when_all_done(upstream, upstream_done)
        return call

    def _with_upstream_refs(self, run_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Any]]:
        """The arguments to send, upstream calls of this runner standing as their refs.

        Every upstream call is done. One whose ref holds its State goes as that
        ``ObjectRef`` (the worker reads it from the object store); any other, e.g. a
        task that died or a call of another runner, goes as its State.
        """
        slots: Dict[Any, _UpstreamSlot] = {}
        refs: List[Any] = []

        def to_slot(value: Any) -> Any:
            if not isinstance(value, PrefectFuture):
                return value
            up = self._call_of(value)
            if type(up) is not _RayCall or up.runner is not self or up.ref is None or up.failed:
                return state_of_done(up)
            slot = slots.get(up.ref)
            if slot is None:
                slot = slots[up.ref] = _UpstreamSlot(len(refs))
                refs.append(up.ref)
            return slot

        return visit_collection(run_kwargs, to_slot), refs

    def _enter(
        self,
        call: _RayCall,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        refs: List[Any],
        options: Mapping[str, Any],
    ) -> None:
        """Hand the call to Ray through the gate: now, or once there is room."""
        gate = self._gate
        if gate is None or self._closing:
            call.set_result(_stopped_state(call))
            return
        hand_over = functools.partial(self._hand_over, call, run_fn, run_kwargs, refs, options)
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

    def _hand_over(
        self,
        call: _RayCall,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        refs: List[Any],
        options: Mapping[str, Any],
    ) -> bool:
        """Submit the call to Ray; False if it was not (cancelled, refused, stopping)."""
        if not call.set_running():  # cancelled while it waited
            return False
        functions = self._remote_functions
        if functions is None or self._closing:
            call.set_result(_stopped_state(call))
            return False
        refused = self._unmet_request(options)
        if refused is not None:
            call.set_result(refused)
            return False
        try:
            remote = functions.get(run_fn)
            if options:
                remote = remote.options(**options)
            ref = remote.remote(run_kwargs, *refs) if run_kwargs or refs else remote.remote()
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

    def _unmet_request(self, options: Mapping[str, Any]) -> Optional[State]:
        """A Crashed state if no live node can ever meet the resources of a call, else None."""
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        fitting = self._fitting_requests
        if fitting is not None and key in fitting:
            return None
        request = _requested_resources({**self.remote_options, **options})
        capacity = self._capacity or []
        if not _fits(request, capacity):
            try:  # a node may have joined since the runner started
                capacity = self._capacity = [
                    dict(node.get("Resources") or {})
                    for node in self._ray.nodes()
                    if node.get("Alive") or node.get("alive")
                ]
            except Exception:
                return None
            if not _fits(request, capacity):
                largest = max(capacity, key=lambda node: node.get("CPU", 0), default={})
                error = ValueError(
                    f"No live node of the Ray cluster can meet the request {request!r}; the "
                    f"largest node has {_describe_node(largest)}. Ask for less in "
                    "`ray_options(...)` or `remote_options`, or add a node that fits."
                )
                return Crashed(message=f"The call can never be scheduled: {error}", data=error)
        if fitting is not None:
            fitting.add(key)
        return None

    def _cancel_ref(self, ref: Any) -> None:
        ray, connection = self._ray, self.connection
        if ray is None or connection == "started" or not ray.is_initialized():
            return  # a local instance the runner started goes down with it
        # A forced cancel kills the worker running the task. Ray may meanwhile have
        # handed that worker the next task of this process (its lease is reused), which
        # then dies too: fine when the runner disconnects next, not on a Ray it joined,
        # where the task gets Ray's KeyboardInterrupt instead.
        try:
            ray.cancel(ref, force=connection == "connected")
        except Exception:  # already finished, or the cluster is gone
            pass

    def _crash_state(self, task_run: TaskRun, exc: BaseException) -> State:
        """The Crashed state for a call whose Ray task ended in ``exc``, naming the cause."""
        exceptions = _import_ray().exceptions
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
            return Crashed(message="Execution was cancelled by the runtime environment.", data=exc)
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


def _send_token_if_available() -> None:
    # Ray authenticates to clusters it finds by itself, but not to an explicit address,
    # so a token-protected head would refuse us. This sets RAY_AUTH_MODE=token for the
    # whole process (as ray.init does for a local instance) only if a token exists.
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def _single_machine_mode(host: Optional[str]) -> Iterator[None]:
    # On Linux, ray.init turns a loopback address into the machine's own address: a new
    # local node then listens on every interface, and a head that listens on 127.0.0.1
    # only (started in single-machine mode) cannot be reached at all. In Ray's
    # single-machine mode (the default on macOS and Windows; elsewhere set by
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported) loopback stays
    # loopback. The switch is read during ray.init, so it is flipped for that call only.
    try:
        from ray._private import ray_constants
    except ImportError:
        ray_constants = None
    if (
        ray_constants is None
        or not getattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        or not _is_loopback(host)
    ):
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = True


def _is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(address: str) -> Optional[str]:
    if "://" in address:
        return None
    host, _, port = address.rpartition(":")
    return host if port.isdigit() else None


def _port_of(address: Optional[str]) -> Optional[int]:
    if not address or "://" in address:
        return None
    _, _, port = address.rpartition(":")
    return int(port) if port.isdigit() else None


def _fits(request: Mapping[str, float], capacity: List[Dict[str, float]]) -> bool:
    return any(
        all(node.get(name, 0) >= amount for name, amount in request.items()) for node in capacity
    )


def _describe_node(node: Mapping[str, float]) -> str:
    shown = {
        name: amount
        for name, amount in node.items()
        if not name.startswith("node:") and name != "object_store_memory"
    }
    return repr(shown) if shown else "no resources"
