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

_monotonic = time.monotonic

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
    "thread_guard",
    "POLL_SECONDS",
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
    kind = type(value)
    if (kind is float or kind is int) and 0 < value < math.inf:
        return float(value)
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
# The latest one handed out: calls of one task, submitted in a row, find it here (it
# keeps one run_fn alive until the next call with a limit).
_last_limited: Optional[Limited] = None


def with_limit(
    run_fn: Callable[..., Any], seconds: Optional[float], shared: bool = True
) -> Callable[..., Any]:
    """``run_fn`` with the limit ``seconds`` (checked already); itself for None.

    :param shared: one object for equal run_fns and limits (False for a run_fn made
        for one call only)
    """
    global _last_limited
    if seconds is None:
        return run_fn
    last = _last_limited
    if last is not None and last.run_fn is run_fn and last.seconds == seconds:
        return last
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
        return Limited(run_fn, seconds)
    _last_limited = limited
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


def timed_out_state(name: str, seconds: float, kind: str = "Task run") -> State:
    """The State of the call of task run ``name`` (or a ``kind`` of that name) that
    went past ``seconds``."""
    message = f"{kind} {name!r} timed out: it ran past its limit of {seconds:g} s (timeout_seconds)."
    return Failed(name=TIMED_OUT, message=message, data=TimeoutError(message))


def is_timed_out(state: Optional[State]) -> bool:
    """Whether ``state`` is that of a call that went past its limit."""
    return state is not None and state.type is StateType.FAILED and state.name == TIMED_OUT


# -- the watchdog ------------------------------------------------------------------


class Alarm:
    """One armed one-off limit: its action runs on the watchdog's thread at
    ``deadline``, unless :meth:`cancel` came first."""

    __slots__ = ("deadline", "action", "cancelled")

    def __init__(self, deadline: float, action: Callable[[], object]) -> None:
        self.deadline = deadline
        self.action = action
        self.cancelled = False

    def cancel(self) -> None:
        """The limit no longer applies: the action will not run (a flag, no lock)."""
        self.cancelled = True
        self.action = _nothing


def _nothing() -> None:
    return None


#: How often the watchdog looks at the guards while one is armed (seconds): how late
#: past its limit a call is stopped, at most, beyond the time its runner takes.
POLL_SECONDS = 0.05
# How often it looks while none is: a guard armed then is seen within this, and
# watched closely from then on (arming also wakes it, unless it was about to sleep).
_IDLE_POLL_SECONDS = 1.0


class Watchdog:
    """A daemon thread that stops calls past their limits.

    It watches two things: :class:`ThreadGuard` s, one per thread that runs calls
    with a limit, which it polls (arming one is two assignments: no lock, no heap,
    nothing left behind once the call ends, however many calls run); and one-off
    :class:`Alarm` s (:meth:`arm`), kept in a heap until their time.
    """

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._guards: "weakref.WeakSet[ThreadGuard]" = weakref.WeakSet()
        self._fired: "weakref.WeakKeyDictionary[ThreadGuard, Any]" = weakref.WeakKeyDictionary()
        self._thread: Optional[threading.Thread] = None
        self._resting = True  # polling slowly: no guard was armed since the last look
        #: Set by every arming (a plain assignment): the watchdog keeps looking closely.
        self.armed_lately = False

    def _ensure_running(self) -> None:
        # With the condition's lock held.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="taskrunners-watchdog", daemon=True)
            self._thread.start()

    def arm(self, seconds: float, action: Callable[[], object]) -> Alarm:
        """Run ``action()`` in ``seconds`` from now, on the watchdog's thread."""
        alarm = Alarm(time.monotonic() + seconds, action)
        with self._cond:
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            self._ensure_running()
            if self._heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def watch(self, guard: "ThreadGuard") -> None:
        """Poll ``guard`` from now on (while it lives)."""
        with self._cond:
            self._guards.add(guard)
            self._ensure_running()
            self._cond.notify()

    def wake(self) -> None:
        """A guard was armed while resting: look closely again."""
        with self._cond:
            self._resting = False
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due: List[Alarm] = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
                guards = list(self._guards)
            armed_any, self.armed_lately = self.armed_lately, False
            for guard in guards:
                armed = guard.armed
                if armed is None:
                    continue
                armed_any = True
                if armed[0] <= now and self._fired.get(guard) is not armed:
                    self._fired[guard] = armed
                    guard._expire(armed)
            for alarm in due:
                if not alarm.cancelled:
                    try:
                        alarm.action()
                    except BaseException:  # an action must never stop the watchdog
                        pass
            del guards, due
            with self._cond:
                self._resting = not armed_any
                wait = POLL_SECONDS if armed_any else _IDLE_POLL_SECONDS
                if self._heap:
                    wait = min(wait, max(0.0, self._heap[0][0] - time.monotonic()))
                self._cond.wait(wait)


_watchdog: Optional[Watchdog] = None
_watchdog_lock = threading.Lock()


def watchdog() -> Watchdog:
    """This process's watchdog."""
    global _watchdog
    found = _watchdog
    if found is not None:
        return found
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = Watchdog()
        return _watchdog


def _forget_watchdog() -> None:
    # A forked child has none of its parent's threads: it makes its own watchdog.
    global _watchdog, _watchdog_lock
    _watchdog, _watchdog_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_watchdog)


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


class ThreadGuard:
    """The watch over the calls with a limit that one thread runs, one after another.

    :meth:`arm` starts a call's clock; once it passes, the watchdog calls the
    ``expire(guard)`` it was given, which stops the work its runner's way, for
    example with :meth:`interrupt`, which raises :class:`CallTimedOut` into the
    thread, and never once the call is over (:meth:`close` takes back one that is
    still pending). Each thread has one (:func:`thread_guard`), reused call after call.
    """

    __slots__ = ("ident", "_lock", "armed", "fired", "_expiring", "_settle", "_dog", "__weakref__")

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self._lock = threading.Lock()
        #: (deadline, expire) while a call runs under a limit, else None.
        self.armed: Optional[Tuple[float, Callable[["ThreadGuard"], object]]] = None
        self.fired = False
        self._expiring: Any = None
        self._settle: Optional[Callable[[], object]] = None
        self._dog: Optional[Watchdog] = None  # the watchdog that polls it

    def arm(self, seconds: float, expire: Callable[["ThreadGuard"], object]) -> None:
        """A call with a limit of ``seconds`` starts in this thread now."""
        self.fired = False
        self.armed = (_monotonic() + seconds, expire)
        dog = _watchdog
        if dog is None or self._dog is not dog:  # not yet watched
            dog = self._dog = watchdog()
            dog.watch(self)
        dog.armed_lately = True
        if dog._resting:
            dog.wake()

    def _expire(self, armed: Any) -> None:
        # On the watchdog's thread: the call armed as ``armed`` ran past its limit.
        with self._lock:
            if self.armed is not armed:  # it ended meanwhile
                return
            self._expiring = armed
        expire: Callable[[ThreadGuard], object] = armed[1]  # type: ignore[index]
        try:
            expire(self)
        except BaseException:  # the watchdog must go on
            pass

    def interrupt(
        self,
        raise_in: Optional[Callable[[], object]] = None,
        settle: Optional[Callable[[], object]] = None,
    ) -> bool:
        """Raise CallTimedOut into the call that expired (on the watchdog's thread);
        False if it is over.

        By default as an asynchronous exception; else ``raise_in()`` raises it (a
        signal), and ``settle()``, run when the call is over, makes sure that it no
        longer will.
        """
        with self._lock:
            if self.armed is None or self.armed is not self._expiring:
                return False
            self.fired = True
            self._settle = settle
            if raise_in is None:
                interrupt_thread(self.ident)
            else:
                raise_in()
            return True

    def close(self) -> None:
        """The call is over (in its own thread): no interruption from now on."""
        with self._lock:
            self.armed = None
            settle, self._settle = self._settle, None
        if settle is not None:
            settle()
        elif self.fired:  # raised already, or still pending: take it back
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), None)


_local = threading.local()


def thread_guard() -> ThreadGuard:
    """The calling thread's guard."""
    try:
        return _local.guard
    except AttributeError:
        guard = _local.guard = ThreadGuard()
        return guard
