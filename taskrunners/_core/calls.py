"""Call handles: the outcome of one submitted call, and waiting for one or several.

Every runner hands back a :class:`Call` (or a subclass that knows its engine) for
each call: a light, thread-safe stand-in for ``concurrent.futures.Future`` whose
result is always the call's :class:`~taskrunners.states.State`, never an exception.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import threading
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from taskrunners.states import State, exception_to_crashed_state

__all__ = [
    "TIMEOUT_ERRORS",
    "Completes",
    "CallHandle",
    "Call",
    "done_call",
    "state_of_done",
    "wait_for_state",
    "when_all_done",
    "block_until_done",
]

TIMEOUT_ERRORS = (concurrent.futures.TimeoutError, TimeoutError, asyncio.TimeoutError)


class Completes(Protocol):
    """Anything that says when it is done: a call, a ``concurrent.futures.Future``."""

    def done(self) -> bool:
        """Whether it is done."""

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(it)`` once it is done (at once if it is)."""


class CallHandle(Completes, Protocol):
    """What the layers above the blocking core may do with a call."""

    def done(self) -> bool:
        """Whether the call has its final State."""

    def running(self) -> bool:
        """Whether the call has started (and cannot be cancelled any more) and is not done."""

    def cancelled(self) -> bool:
        """Whether the call was cancelled before it started."""

    def cancel(self) -> bool:
        """Cancel the call if it has not started; as ``concurrent.futures.Future.cancel``."""

    def result(self, timeout: Optional[float] = None) -> State:
        """The call's State, once done; raises TimeoutError if ``timeout`` passes first."""

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(call)`` once the call is done (at once if it is)."""

    def expedite(self) -> None:
        """Somebody waits for the call: if it waits to fill a batch, send it now."""


# Calls share a few locks, each held only for a few assignments and never with
# another: a lock per call would be one more object per call for the collector.
_LOCKS = tuple(threading.Lock() for _ in range(64))
_next_lock = itertools.count().__next__
# What a call's callbacks are before the first is added (then the callback itself,
# then a list of them; None once they have run).
_NO_CALLBACKS: Any = ()


class Call:
    """The outcome of one call: its State is set once, from any thread.

    A call not yet running can be cancelled: it then ends Crashed with the
    cancellation message, and :meth:`set_running` tells the worker not to run it.
    Many calls may be pending at once, so a call is kept small: the garbage
    collector walks every one of them.
    """

    __slots__ = ("_state", "_running", "_cancelled", "_callbacks", "_lock", "_finished")

    def __init__(self) -> None:
        self._state: Optional[State] = None
        self._running = False
        self._cancelled = False
        self._callbacks: Any = _NO_CALLBACKS
        self._lock = _LOCKS[_next_lock() & 63]
        self._finished: Optional[threading.Event] = None

    def done(self) -> bool:
        return self._state is not None

    def running(self) -> bool:
        """Started and not finished: from now on :meth:`cancel` refuses."""
        return self._running and self._state is None

    def cancelled(self) -> bool:
        return self._cancelled

    def set_running(self) -> bool:
        """Mark the call running; False if it was cancelled first (do not run it)."""
        with self._lock:
            if self._state is not None or self._cancelled:
                return False
            self._running = True
            return True

    def cancel(self) -> bool:
        """Cancel the call if it has not started; as ``concurrent.futures.Future.cancel``."""
        with self._lock:
            if self._running or self._state is not None:
                return self._cancelled
            self._cancelled = True
        self.set_result(_cancelled_state())
        return True

    def set_cancelled(self) -> None:
        """End the call as cancelled: it never started, and never will."""
        with self._lock:
            if self._state is None:
                self._cancelled = True
        self.set_result(_cancelled_state())

    def set_result(self, state: State) -> None:
        """Set the call's State, unless it has one already."""
        with self._lock:
            if self._state is not None:
                return
            self._state = state
            callbacks, self._callbacks = self._callbacks, None
            if self._finished is not None:
                self._finished.set()
        if type(callbacks) is list:
            for callback in callbacks:
                callback(self)
        elif callbacks is not _NO_CALLBACKS:
            callbacks(self)

    def result(self, timeout: Optional[float] = None) -> State:
        state = self._state
        if state is None:
            with self._lock:
                if self._state is None and self._finished is None:
                    self._finished = threading.Event()
                finished = self._finished
            if finished is not None and not finished.wait(timeout):
                raise TimeoutError
            state = self._state
            assert state is not None
        return state

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        with self._lock:
            callbacks = self._callbacks
            if callbacks is not None:
                if callbacks is _NO_CALLBACKS:
                    self._callbacks = fn
                elif type(callbacks) is list:
                    callbacks.append(fn)
                else:
                    self._callbacks = [callbacks, fn]
                return
        fn(self)

    def expedite(self) -> None:
        """Somebody waits for the call: nothing to do, unless a batch holds it back."""


def _cancelled_state() -> State:
    return exception_to_crashed_state(concurrent.futures.CancelledError())


def done_call(state: State) -> Call:
    """A call that is already done, in ``state``."""
    call = Call()
    call._state = state
    call._callbacks = None
    return call


def state_of_done(call: CallHandle) -> State:
    """The State of a call that is done."""
    try:
        return call.result(0)
    except BaseException as exc:  # a handle that raises instead (a cancelled Future)
        return exception_to_crashed_state(exc)


def wait_for_state(call: CallHandle, timeout: Optional[float]) -> Optional[State]:
    """Block until ``call`` is done and return its State, or None after ``timeout``."""
    if not call.done():
        call.expedite()
        # Anything raised here but a timeout or the call's own cancellation is the
        # waiting caller's (a Ctrl-C): it goes on even if the call just finished.
        try:
            call.result(timeout)
        except TIMEOUT_ERRORS:
            if not call.done():
                return None
        except concurrent.futures.CancelledError:
            if not call.cancelled():
                raise
    return state_of_done(call)


def when_all_done(calls: Sequence[CallHandle], then: Callable[[], object]) -> None:
    """Call ``then()`` once every call in ``calls`` is done (at once if none is pending).

    It runs in the thread that finishes the last call, so it must not block.
    """
    remaining = [len(calls)]
    if not calls:
        then()
        return
    lock = threading.Lock()

    def one_done(_: object) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        then()

    for call in calls:
        call.add_done_callback(one_done)


def block_until_done(calls: Iterable[CallHandle]) -> None:
    """Block the calling thread until every call in ``calls`` is done."""
    for call in calls:
        if not call.done():
            call.expedite()
            finished = threading.Event()
            call.add_done_callback(functools.partial(_set_event, finished))
            finished.wait()


def _set_event(event: threading.Event, _: object) -> None:
    event.set()
