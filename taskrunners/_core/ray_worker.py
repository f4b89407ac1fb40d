"""What runs inside Ray workers, and the Ray remote functions that carry it there.

How a call travels: the runner wraps each ``run_fn`` once in a remote function
(:class:`RemoteFunctions`) and calls it with ``(run_kwargs, *upstream refs)``; Ray
puts each upstream call's packed State in place of its ``ObjectRef``, and
:func:`run_call` puts those States in place of the ``Upstream(n)`` placeholders in
``run_kwargs``, runs the call to a State and sends it back packed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from typing import Any, Callable, Dict, Hashable, Iterator, Mapping, Optional, Tuple

from taskrunners._core.remote import run_in_worker, substitute
from taskrunners.states import State

__all__ = ["packed", "unpacked", "run_call", "interrupt_tick", "RemoteFunctions"]


def packed(state: State) -> Any:
    """``state`` as what travels through Ray: a plain tuple for a plain State."""
    # Ray pickles a State several times slower than a tuple, which shows on calls that
    # do little.
    if type(state) is State:
        return (state.type.value, state.name, state.message, state.data)
    return state


def unpacked(value: Any) -> Any:
    """The State that :func:`packed` gave ``value`` for."""
    if type(value) is tuple:
        return State(value[0], name=value[1], message=value[2], data=value[3])
    return value


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
    """Run one call in a Ray worker; its State, packed. ``upstream``: packed upstream States."""
    if upstream:
        states: Dict[Hashable, Any] = {n: unpacked(value) for n, value in enumerate(upstream)}
        run_kwargs = substitute(run_kwargs, states.__getitem__)
    state, _ = run_in_worker(run_fn, run_kwargs, watch=interrupt_tick)
    return packed(state)


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


def _remote_function(ray: Any, run_fn: Callable[..., Any], options: Mapping[str, Any]) -> Any:
    holder = _RunFnHolder(run_fn)

    def run_remote(*arguments: Any) -> Any:
        # (run_kwargs, *upstream States), or nothing at all for a call without arguments.
        run_kwargs = arguments[0] if arguments else {}
        return run_call(holder.get(), run_kwargs, arguments[1:])

    # Ray names tasks after the function: show the run_fn's name in its dashboard.
    name = getattr(run_fn, "__name__", None) or type(run_fn).__name__
    run_remote.__name__ = run_remote.__qualname__ = name
    return ray.remote(**options)(run_remote)


def check_remote_options(ray: Any, options: Mapping[str, Any]) -> None:
    """:raises ValueError: if Ray refuses ``options`` for a remote function"""
    try:
        ray.remote(**options)(run_call)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Ray refused `remote_options={dict(options)!r}`: {exc}") from exc


class RemoteFunctions:
    """Ray remote functions by run_fn, each held as long as its run_fn lives.

    Exporting a remote function costs a round trip to the cluster, so each run_fn is
    wrapped and exported once, not once per call. The run_fns are weak keys: equal
    ones (the same method of one object, fetched twice) share their remote function,
    and one that cannot be a weak key (not hashable or not weak-referenceable) is
    wrapped anew for every call.
    """

    def __init__(self, ray: Any, options: Mapping[str, Any]) -> None:
        self._ray = ray
        self._options = options
        # The lock makes each run_fn exported once when threads submit it together.
        self._lock = threading.Lock()
        self._entries: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    def get(self, run_fn: Callable[..., Any]) -> Any:
        """The remote function that runs ``run_fn``."""
        try:
            remote = self._entries.get(run_fn)
        except TypeError:
            return _remote_function(self._ray, run_fn, self._options)
        if remote is not None:
            return remote
        with self._lock:
            remote = self._entries.get(run_fn)
            if remote is None:
                remote = _remote_function(self._ray, run_fn, self._options)
                self._entries[run_fn] = remote
            return remote
