"""Time limits on calls (``timeout_seconds``): how a limit travels with its call, the
State of a call that went past it, and the watchdog that acts when a limit passes.

A call with a limit reaches its runner as a :class:`Limited` run_fn: the run_fn
and its limit in seconds, so that every runner's path (batches, pickling, Ray's
remote functions) carries the limit without a field of its own. The runner takes it
apart (:func:`split_limit`) where the call starts, arms the process's
:class:`Watchdog` for it, and stops the work its own way when the alarm goes off:
an exception raised into the call's thread (:func:`interrupt_thread`), the call's
coroutine cancelled, or its worker process ended. The call's State is then
:func:`timed_out_state`: Failed, named ``"TimedOut"``, holding a ``TimeoutError``.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import math
import os
import threading
import time
import weakref
from typing import Any, Callable, List, Optional, Tuple

from taskrunners.states import Failed, State, StateType

__all__ = [
    "TIMED_OUT",
    "check_timeout",
    "Limited",
    "with_limit",
    "split_limit",
    "CallTimedOut",
    "timed_out_state",
    "is_timed_out",
    "Alarm",
    "Watchdog",
    "watchdog",
    "interrupt_thread",
    "ThreadGuard",
    "run_limited",
    "arun_limited",
]

#: The name of a timed-out call's State.
TIMED_OUT = "TimedOut"


def check_timeout(value: Any, argument: str) -> Optional[float]:
    """``value`` as a limit in seconds (None: no limit).

    :raises TypeError: if it is not a number, naming ``argument``
    :raises ValueError: if it is not positive and finite, naming ``argument``
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{argument} must be a number of seconds or None (no limit), "
            f"got {type(value).__name__} {value!r}."
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{argument} must be a positive, finite number of seconds or None (no limit), "
            f"got {value!r}."
        )
    return float(value)


class Limited:
    """A run_fn and its time limit: what a runner is handed for a call with a timeout.

    Called directly it only calls ``run_fn``: the runner enforces the limit.
    """

    __slots__ = ("run_fn", "seconds", "__weakref__")

    def __init__(self, run_fn: Callable[..., Any], seconds: float) -> None:
        self.run_fn = run_fn
        self.seconds = seconds

    def __call__(self, **run_kwargs: Any) -> Any:
        return self.run_fn(**run_kwargs)

    def __batch_key__(self, run_kwargs: Any) -> Any:
        """The task a call belongs to, as for its run_fn alone (see ``batching``)."""
        key_of = getattr(self.run_fn, "__batch_key__", None)
        return self.run_fn if key_of is None else key_of(run_kwargs)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (Limited, (self.run_fn, self.seconds))

    def __repr__(self) -> str:
        return f"Limited({self.run_fn!r}, {self.seconds!r})"


# One Limited per (run_fn, limit) while in use: the runners gather calls into batches
# (and Ray makes a remote function) by run_fn, so equal limits must give one object.
_limited: "weakref.WeakValueDictionary[Tuple[Any, float], Limited]" = weakref.WeakValueDictionary()
_limited_lock = threading.Lock()


def with_limit(
    run_fn: Callable[..., Any], seconds: Optional[float], shared: bool = True
) -> Callable[..., Any]:
    """``run_fn`` with the limit ``seconds`` (checked already); itself for None.

    :param shared: one object for equal run_fns and limits (False for a run_fn made
        for one call only)
    """
    if seconds is None:
        return run_fn
    run_fn, _ = split_limit(run_fn)  # the latest limit wins
    if not shared:
        return Limited(run_fn, seconds)
    key = (run_fn, seconds)
    try:
        with _limited_lock:
            limited = _limited.get(key)
            if limited is None:
                limited = _limited[key] = Limited(run_fn, seconds)
    except TypeError:  # a run_fn that cannot be a dict key
        limited = Limited(run_fn, seconds)
    return limited


def split_limit(run_fn: Callable[..., Any]) -> Tuple[Callable[..., Any], Optional[float]]:
    """``(run_fn, seconds)`` of a :class:`Limited`; ``(run_fn, None)`` of anything else."""
    if type(run_fn) is Limited:
        return run_fn.run_fn, run_fn.seconds
    return run_fn, None


class CallTimedOut(BaseException):
    """Raised into a call that went past its limit, to stop it.

    A ``BaseException``, so that a call's own ``except Exception`` does not catch it;
    its ``finally`` blocks and context managers run.
    """


def timed_out_state(name: str, seconds: float) -> State:
    """The State of the call of task run ``name`` that went past ``seconds``."""
    message = f"Task run {name!r} timed out: it ran past its limit of {seconds:g} s (timeout_seconds)."
    return Failed(name=TIMED_OUT, message=message, data=TimeoutError(message))


def is_timed_out(state: Optional[State]) -> bool:
    """Whether ``state`` is that of a call that went past its limit."""
    return state is not None and state.type is StateType.FAILED and state.name == TIMED_OUT


# -- the watchdog ------------------------------------------------------------------


class Alarm:
    """One armed limit: its action runs on the watchdog's thread at ``deadline``,
    unless :meth:`cancel` came first."""

    __slots__ = ("deadline", "action", "cancelled")

    def __init__(self, deadline: float, action: Callable[[], object]) -> None:
        self.deadline = deadline
        self.action = action
        self.cancelled = False

    def cancel(self) -> None:
        """The call ended in time: the action will not run (a cheap flag, no lock)."""
        self.cancelled = True
        self.action = _nothing


def _nothing() -> None:
    return None


class Watchdog:
    """A daemon thread that runs each :class:`Alarm`'s action when its time comes.

    Arming is a heap push under a lock and wakes the thread only when the new alarm
    is the earliest; cancelled alarms stay in the heap until their time, and cost
    nothing but the entry.
    """

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: Optional[threading.Thread] = None

    def arm(self, seconds: float, action: Callable[[], object]) -> Alarm:
        """Run ``action()`` in ``seconds`` from now, on the watchdog's thread."""
        alarm = Alarm(time.monotonic() + seconds, action)
        with self._cond:
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="taskrunners-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        alarm = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(delay)
            if not alarm.cancelled:
                try:
                    alarm.action()
                except BaseException:  # an action must never stop the watchdog
                    pass
            del alarm


_watchdog: Optional[Watchdog] = None
_watchdog_pid = 0
_watchdog_lock = threading.Lock()


def watchdog() -> Watchdog:
    """This process's watchdog (a forked child gets its own)."""
    global _watchdog, _watchdog_pid
    found = _watchdog
    if found is not None and _watchdog_pid == os.getpid():
        return found
    with _watchdog_lock:
        if _watchdog is None or _watchdog_pid != os.getpid():
            _watchdog, _watchdog_pid = Watchdog(), os.getpid()
        return _watchdog


def interrupt_thread(ident: int, exc_type: type = CallTimedOut) -> bool:
    """Raise ``exc_type`` in the thread ``ident`` when it next runs Python code.

    A thread blocked in C (a sleep, a read) gets it only once that returns. False if
    there is no such thread.
    """
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    found = set_async_exc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))
    if found > 1:  # never expected: undo, as the C API asks
        set_async_exc(ctypes.c_ulong(ident), None)
        return False
    return bool(found)


# -- running a call under its limit -------------------------------------------------


class ThreadGuard:
    """Lets the watchdog raise :class:`CallTimedOut` into the thread running one call,
    and never once the call is over (a pending one is then taken back)."""

    __slots__ = ("ident", "_lock", "_live", "fired")

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self._lock = threading.Lock()
        self._live = True
        self.fired = False

    def interrupt(self) -> bool:
        """Raise CallTimedOut into the call (on the watchdog's thread); False if it is over."""
        with self._lock:
            if not self._live:
                return False
            self.fired = True
            interrupt_thread(self.ident)
            return True

    def close(self) -> None:
        """The call is over (in its own thread): no interruption from now on."""
        with self._lock:
            self._live = False
        if self.fired:  # raised already, or still pending: take it back
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), None)


def run_limited(
    run_fn: Callable[..., Any],
    run_kwargs: Any,
    seconds: float,
    name: str,
    expire: Callable[[ThreadGuard], object],
) -> State:
    """Run a plain ``run_fn`` in this thread; ``expire(guard)`` runs on the watchdog's
    thread if ``seconds`` pass first (``guard.interrupt`` raises into the call).

    A call that ends by the interruption is :func:`timed_out_state`.
    """
    from taskrunners._core.running import run_to_state

    guard = ThreadGuard()
    try:
        alarm = watchdog().arm(seconds, lambda: expire(guard))
        try:
            state = run_to_state(run_fn, run_kwargs)
        finally:
            alarm.cancel()
            guard.close()
    except CallTimedOut:  # raised between the call's end and close()
        guard.close()
    if guard.fired:
        return timed_out_state(name, seconds)
    return state


async def arun_limited(run_fn: Callable[..., Any], run_kwargs: Any, seconds: float, name: str) -> State:
    """Await a coroutine ``run_fn``, cancelled once ``seconds`` pass (any anyio backend)."""
    import anyio

    from taskrunners._core.running import arun_to_state

    with anyio.move_on_after(seconds) as scope:
        state = await arun_to_state(run_fn, run_kwargs)
    # The cancellation may have been caught inside, as a Crashed state.
    if scope.cancelled_caught or (scope.cancel_called and state.is_crashed()):
        return timed_out_state(name, seconds)
    return state
