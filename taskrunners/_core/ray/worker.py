"""What runs inside Ray workers, and the Ray remote functions that carry it there.

How a call travels: the runner has one remote function per task (:class:`RemoteFunctions`)
and calls it in one of two shapes:

- one call alone, ``(run_kwargs, *upstream refs)``: the remote function holds the
  run_fn (it is the task itself); :func:`run_call` runs it and sends back its State
  and how long it took, :func:`packed`;
- a batch, ``(BatchPayload, *upstream refs)``: :func:`run_batch_call` runs its calls
  in order (:func:`~taskrunners._core.remote.protocol.run_batch`), marking each one started
  and finished in the runner's slot table, and sends back every State and duration
  pickled together (:func:`~taskrunners._core.remote.protocol.encode_batch`).

A call with a time limit that passes it ends its worker process, as a forced
``ray.cancel`` would, without a trip to the parent (which does not know when a call of
a batch started): see ``remote.slots.Marks.expiry``. Its ``finally`` blocks do not run.
Such calls go as batches, so that they have a slot to be marked timed out in.

Ray puts what each upstream ref holds in its place: a packed State, or the outcomes
of a batch, of which the call's places say which one it needs. Those States then
take the place of the ``Upstream(n)`` placeholders in ``run_kwargs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    Hashable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    cast,
)

from taskrunners._core.limits import Limited, split_limit
from taskrunners._core.ray.placed import PickledCall, unpickled_call
from taskrunners._core.remote import sharing, slots as slot_marks
from taskrunners._core.remote.sharing import DEFAULT_LARGE_VALUE_BYTES
from taskrunners._core.remote.protocol import decode_batch, encode_batch, run_batch, run_in_worker, substitute
from taskrunners.states import Crashed, State

__all__ = [
    "packed",
    "unpacked",
    "run_call",
    "BatchPayload",
    "run_batch_call",
    "interrupt_tick",
    "RemoteFunction",
    "RemoteFunctions",
    "Unbatched",
    "check_remote_options",
]

WHERE = "a Ray worker"


def packed(state: State, seconds: float) -> Tuple[Any, ...]:
    """``state`` and the seconds its call took, as what travels through Ray: a plain tuple."""
    # Ray pickles a State several times slower than a tuple, which shows on calls that
    # do little. The first item stays the State's type, for anyone reading the ref.
    if type(state) is State:
        return (state.type.value, state.name, state.message, state.data, seconds)
    return (state, seconds)


def unpacked(value: Tuple[Any, ...]) -> Tuple[State, float]:
    """The State and seconds that :func:`packed` gave ``value`` for."""
    if len(value) == 2:
        return value[0], value[1]
    return State(value[0], name=value[1], message=value[2], data=value[3]), value[4]


# How often a coroutine call's event loop wakes up to take Ray's KeyboardInterrupt.
INTERRUPT_CHECK_SECONDS = 0.1


@contextlib.contextmanager
def interrupt_tick(loop: asyncio.AbstractEventLoop, task: "asyncio.Task[State]") -> Iterator[None]:
    """Wake ``loop`` up regularly while a coroutine call runs on it.

    Ray cancels a running task by raising KeyboardInterrupt at the worker's next
    Python instruction; an event loop asleep in ``select()`` would not run one until
    its next timer.
    """
    timer: Optional[asyncio.TimerHandle] = None

    def tick() -> None:
        nonlocal timer
        timer = loop.call_later(INTERRUPT_CHECK_SECONDS, tick)

    tick()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def run_call(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], upstream: tuple) -> Any:
    """Run one call in a Ray worker; its State and seconds, packed.

    ``upstream``: what the upstream refs hold, each a packed State.
    """
    if upstream:
        states: Dict[Hashable, Any] = {n: unpacked(value)[0] for n, value in enumerate(upstream)}
        run_kwargs = substitute(run_kwargs, states.__getitem__)
    begun = time.perf_counter()
    if type(run_fn) is Limited:  # sent alone only when the runner has no slot table
        name = _task_name(run_fn)
        expire = slot_marks.Marks(None, None).expiry(0)
        state, _ = run_in_worker(run_fn, run_kwargs, interrupt_tick, expire, name)
    else:
        state, _ = run_in_worker(run_fn, run_kwargs, watch=interrupt_tick)
    return packed(state, time.perf_counter() - begun)


#: Where an upstream State is: (index of its ref among the task's arguments, its place
#: in that ref's batch, or None for a ref holding one packed State[, the ref's id]).
Place = Tuple[Any, ...]


class BatchPayload:
    """The calls of one batch, as one Ray task's first argument.

    :param names: each call's task run name, for messages
    :param calls: each call's ``(run_fn or None for the remote function's own,
        run_kwargs, places of its Upstream(n) placeholders or None)``; or ``(None,
        PickledCall, places)`` for a call the sender pickled (see ``ray.placed``)
    :param table: the runner's slot table, or None
    :param slots: the calls' slots in it, one each, or None
    """

    __slots__ = ("names", "calls", "table", "slots")

    def __init__(
        self,
        names: List[str],
        calls: List[Tuple[Optional[Callable[..., Any]], Dict[str, Any], Optional[List[Place]]]],
        table: Optional[str],
        slots: Optional[range],
    ) -> None:
        self.names = names
        self.calls = calls
        self.table = table
        self.slots = slots

    def __reduce__(self) -> Tuple[Any, ...]:
        return (BatchPayload, (self.names, self.calls, self.table, self.slots))


def run_batch_call(
    batch: BatchPayload, own_run_fn: Optional[Callable[[], Callable[..., Any]]], upstream: tuple
) -> bytes:
    """Run the calls of a batch in a Ray worker; their States and seconds, pickled together.

    Nothing a call does reaches another: each call's upstream States are put in place
    just before it runs, and a failure there is that call's Crashed state.
    """
    batches: Dict[int, List[Tuple[State, float]]] = {}

    def upstream_state(place: Place) -> State:
        index, position = place[0], place[1]
        if position is None:
            if len(place) > 2:  # a large value: fetched here once (see sending)
                return sharing.load(f"upstream-{place[2]}", lambda: _fetched(upstream[index]))
            return unpacked(upstream[index])[0]
        outcomes = batches.get(index)
        if outcomes is None:
            outcomes = batches[index] = _decoded_batch(place, upstream[index])
        return outcomes[position][0]

    def prepared(run_fn: Any, run_kwargs: Any, places: Optional[List[Place]]) -> Any:
        try:
            if type(run_kwargs) is PickledCall:
                run_fn, run_kwargs = unpickled_call(run_kwargs, upstream)
            if run_fn is None:
                assert own_run_fn is not None, "a batch without its run_fns"
                run_fn = own_run_fn()
            if places:
                where = places
                run_kwargs = substitute(run_kwargs, lambda n: upstream_state(where[cast(int, n)]))
        except Exception as exc:
            crashed = Crashed(
                message=f"The call could not be prepared in {WHERE}: {type(exc).__name__}: {exc}",
                data=exc,
            )
            return (lambda: crashed), {}
        return run_fn, run_kwargs

    marks = slot_marks.Marks(batch.table, batch.slots)
    cancelled = _cancel_check()

    def starting(index: int) -> bool:
        # A cancelled batch (ray.cancel without force) gets KeyboardInterrupt in the call
        # that runs; the calls after it must not start at all.
        if index and cancelled():
            return False
        return marks.started(index)

    calls = (prepared(*call) for call in batch.calls)
    outcomes: List[Tuple[State, float, Optional[BaseException]]] = []  # read at a limit
    marks.watch(batch.names, outcomes, [], WHERE)
    try:
        run_batch(marks.limits(list(calls)), interrupt_tick, starting, marks.finished, marks.expiry, batch.names, outcomes)
    finally:
        marks.close()
    return encode_batch(batch.names, [(state, seconds) for state, seconds, _ in outcomes], [], WHERE)


def _fetched(nested: Tuple[Any]) -> State:
    import ray

    return unpacked(ray.get(nested[0]))[0]


def _decoded_batch(place: Place, value: Any) -> List[Tuple[State, float]]:
    """An upstream batch's outcomes; large ones decoded once in this worker (kept until
    unused a while), for every call here that takes them."""
    decode = lambda: decode_batch([f"upstream {place[0]}"], value)[0]  # noqa: E731
    if len(place) < 3 or not isinstance(value, bytes) or len(value) < DEFAULT_LARGE_VALUE_BYTES:
        return decode()
    return sharing.load(f"upstream-{place[2]}", decode)


def _cancel_check() -> Callable[[], bool]:
    """Whether ``ray.cancel`` was called on the task running here (False if Ray cannot say)."""
    try:
        import ray

        # Fetched once: get_runtime_context() is not free in a worker.
        is_canceled = ray.get_runtime_context().is_canceled
    except Exception:  # a Ray without it: the batch runs on
        return lambda: False

    def cancelled() -> bool:
        try:
            return bool(is_canceled())
        except Exception:
            return False

    return cancelled


class _RunFnHolder:
    """Holds a run_fn for its remote function: weakly in this process, strongly once pickled.

    The remote function must not keep its run_fn alive here, or the cache of remote
    functions, keyed weakly by run_fn, would never let go of either.
    """

    __slots__ = ("_weak", "_strong")

    def __init__(self, run_fn: Callable[..., Any], weak: bool = True) -> None:
        self._weak: Optional[weakref.ReferenceType] = None
        self._strong: Optional[Callable[..., Any]] = run_fn
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


class RemoteFunction(NamedTuple):
    """The Ray remote function of one task."""

    function: Any
    #: Whether it holds the task's run_fn (the task is its run_fn): then a call alone
    #: goes as ``(run_kwargs, *refs)``, and a batch's calls need not carry it.
    holds_run_fn: bool


class Unbatched:
    """The task of a call whose task cannot be a dictionary key: its calls are never batched."""

    __slots__ = ("run_fn",)

    def __init__(self, run_fn: Callable[..., Any]) -> None:
        self.run_fn = run_fn


def _task_name(task: Any) -> str:
    if type(task) is Unbatched:
        task = task.run_fn
    task, _ = split_limit(task)  # a call with a limit: its run_fn's name
    name = getattr(task, "name", None)  # a flow's Task: the name it was given
    if not isinstance(name, str):
        name = getattr(task, "__name__", None) or type(task).__name__
    return name


def _remote_function(
    ray: Any, task: Any, run_fn: Callable[..., Any], options: Mapping[str, Any]
) -> RemoteFunction:
    holds = run_fn is task
    holder = _RunFnHolder(run_fn) if holds else None
    own_run_fn = holder.get if holder is not None else None

    def run_remote(*arguments: Any) -> Any:
        # (BatchPayload, *upstream), (run_kwargs, *upstream), or nothing at all.
        if arguments and type(arguments[0]) is BatchPayload:
            return run_batch_call(arguments[0], own_run_fn, arguments[1:])
        assert holder is not None, "a call alone sent to a remote function without its run_fn"
        run_kwargs = arguments[0] if arguments else {}
        return run_call(holder.get(), run_kwargs, arguments[1:])

    # Ray names tasks after the function: show the task's name in its dashboard.
    run_remote.__name__ = run_remote.__qualname__ = _task_name(task)
    return RemoteFunction(ray.remote(**options)(run_remote), holds)


def check_remote_options(ray: Any, options: Mapping[str, Any]) -> None:
    """:raises ValueError: if Ray refuses ``options`` for a remote function"""
    try:
        ray.remote(**options)(run_call)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Ray refused `remote_options={dict(options)!r}`: {exc}") from exc


class RemoteFunctions:
    """Ray remote functions by task, each held as long as its task lives.

    Exporting a remote function costs a round trip to the cluster, so each task is
    wrapped and exported once, not once per call. A task is the run_fn, or what the
    run_fn names (the task behind the flows' wrapper); the tasks are weak keys:
    equal ones (the same method of one object, fetched twice) share their remote
    function, and one that cannot be a weak key is wrapped anew for every batch.
    """

    def __init__(self, ray: Any, options: Mapping[str, Any]) -> None:
        self._ray = ray
        #: The runner's remote options, which every remote function gets.
        self.options = options
        # The lock makes each task exported once when threads submit it together.
        self._lock = threading.Lock()
        self._entries: "weakref.WeakKeyDictionary[Any, RemoteFunction]" = weakref.WeakKeyDictionary()

    def get(self, task: Any, run_fn: Callable[..., Any]) -> RemoteFunction:
        """The remote function that runs the calls of ``task``, whose run_fn is ``run_fn``."""
        try:
            remote = self._entries.get(task)
        except TypeError:
            return _remote_function(self._ray, task, run_fn, self.options)
        if remote is not None:
            return remote
        with self._lock:
            remote = self._entries.get(task)
            if remote is None:
                remote = self._entries[task] = _remote_function(
                    self._ray, task, run_fn, self.options
                )
            return remote
