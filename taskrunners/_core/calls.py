"""Call handles: the outcome of one submitted call, and waiting for one or several.

Every runner hands back a :class:`Call` (or a subclass that knows its engine) for
each call: a light, thread-safe stand-in for ``concurrent.futures.Future`` whose
result is always the call's :class:`~taskrunners.states.State`, never an exception.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import threading
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from taskrunners.states import State, exception_to_crashed_state

__all__ = [
    "TIMEOUT_ERRORS",
    "Completes",
    "CallHandle",
    "Phase",
    "Call",
    "Relay",
    "cancelled_state",
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
# another: a lock per call would be one more object per call for the collector. A
# call's lock is found from its address (objects are 16-byte aligned), so that no
# call keeps a field for it.
_LOCKS = tuple(threading.Lock() for _ in range(64))
# What a call's callbacks are before the first is added (then the callback itself,
# then a list of them; None once they have run).
_NO_CALLBACKS: Any = ()


class Phase(enum.IntEnum):
    """Where a call is in its life: the one field that says so, ``Call._phase``.

    Each phase is a bit, so that :meth:`Call._move` takes the phases it moves from as
    one mask (``PENDING | RUNNING``), and they are in order: from CANCELLED on, the
    call is done.
    """

    #: Submitted and not started: it may still be cancelled (gathered in a
    #: dispatcher, waiting for upstream calls, queued in an engine).
    PENDING = 1
    #: Started: it runs to its end, and cancelling it is refused.
    RUNNING = 2
    #: Not started and to be cancelled: it is not handed to the engine (again) from now
    #: on and cannot start; its cancellation follows (Dask decides it under a lock of
    #: its own, and sets the State outside that lock).
    CANCELLING = 4
    #: Done: cancelled before it started (or stopped when its block was left); its
    #: State is the cancellation.
    CANCELLED = 8
    #: Done: it has its State.
    DONE = 16


PENDING, RUNNING, CANCELLING, CANCELLED, DONE = Phase
# The phases each move starts from, as masks. A call's phase only ever grows.
_STARTABLE = PENDING | RUNNING
_UNSTARTED = PENDING | CANCELLING
_LIVE = PENDING | RUNNING | CANCELLING


def cancelled_state() -> State:
    """The State of a call cancelled before it started."""
    return exception_to_crashed_state(concurrent.futures.CancelledError())


class Call:
    """The outcome of one call: its State is set once, from any thread.

    Its :class:`Phase` is one field, changed only by :meth:`_move`, with these moves:

    ============================  =============================  =====================
    method                        from                           to
    ============================  =============================  =====================
    :meth:`set_running`           PENDING, RUNNING               RUNNING
    :meth:`cancel`                PENDING, CANCELLING            CANCELLED
    :meth:`set_cancelled`         PENDING, RUNNING, CANCELLING   CANCELLED
    :meth:`set_result`            PENDING, RUNNING, CANCELLING   DONE
    ``DaskCall.hold_back``        PENDING (or RUNNING: abort)    CANCELLING
    ============================  =============================  =====================

    As in ``concurrent.futures``: a started call cannot be cancelled, a cancelled one
    never starts, and a done one never changes. Its State is a field apart (as a
    ``Future``'s result is), set by the move that ends the call. Many calls may be
    pending at once, so a call is kept small: the garbage collector walks every one.
    """

    __slots__ = ("_phase", "_state", "_callbacks", "_finished")

    def __init__(self) -> None:
        self._phase = PENDING
        self._state: Optional[State] = None
        self._callbacks: Any = _NO_CALLBACKS
        self._finished: Optional[threading.Event] = None

    def _move(self, allowed: int, to: Phase, state: Optional[State] = None) -> bool:
        """Move the call to ``to`` if its phase is one of ``allowed`` (a mask of
        phases); False if it is not. A move that ends the call (to CANCELLED or DONE)
        gives it ``state``, then runs its done callbacks, outside the lock."""
        with _LOCKS[(id(self) >> 4) & 63]:
            if not self._phase & allowed:
                return False
            if state is None:
                self._phase = to
                return True
            # The State first: a call seen done without the lock has it.
            self._state = state
            self._phase = to
            callbacks, self._callbacks = self._callbacks, None
            if self._finished is not None:
                self._finished.set()
        self._ended()
        if type(callbacks) is list:
            for callback in callbacks:
                callback(self)
        elif callbacks is not _NO_CALLBACKS:
            callbacks(self)
        return True

    def _ended(self) -> None:
        """The call just got its State: a subclass lets go of what it held for it."""

    def done(self) -> bool:
        return self._phase >= CANCELLED

    def running(self) -> bool:
        """Started and not finished: from now on :meth:`cancel` refuses."""
        return self._phase is RUNNING

    def cancelled(self) -> bool:
        return self._phase is CANCELLED

    def set_running(self) -> bool:
        """Mark the call running; False if it was cancelled first (do not run it)."""
        return self._move(_STARTABLE, RUNNING)

    def cancel(self) -> bool:
        """Cancel the call if it has not started; as ``concurrent.futures.Future.cancel``."""
        if self._phase & _UNSTARTED and self._move(_UNSTARTED, CANCELLED, cancelled_state()):
            return True
        return self._phase is CANCELLED

    def set_cancelled(self) -> None:
        """End the call as cancelled, whether it started or not (its pool or block is gone)."""
        if self._phase & _LIVE:
            self._move(_LIVE, CANCELLED, cancelled_state())

    def set_result(self, state: State) -> None:
        """Set the call's State, unless it has one already."""
        self._move(_LIVE, DONE, state)

    def result(self, timeout: Optional[float] = None) -> State:
        state = self._state
        if state is None:
            with _LOCKS[(id(self) >> 4) & 63]:
                if self._state is None and self._finished is None:
                    self._finished = threading.Event()
                finished = self._finished
            if finished is not None and not finished.wait(timeout):
                raise TimeoutError
            state = self._state
            assert state is not None
        return state

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        with _LOCKS[(id(self) >> 4) & 63]:
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


class Relay(Call):
    """A call that stands for other calls in turn: waiting for its upstream calls, then
    the call it was started as (or one try, then the next); it ends with the State
    the last of them hands it through a callback."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        super().__init__()
        self.started: Optional[Any] = None  # the call it stands for now, if any

    def running(self) -> bool:
        started = self.started
        return started is not None and started.running()

    def cancel(self) -> bool:
        started = self.started
        if started is None:
            return super().cancel()
        return started.cancel()  # its State reaches this call through a callback

    def expedite(self) -> None:
        started = self.started
        if started is not None:
            started.expedite()


def done_call(state: State) -> Call:
    """A call that is already done, in ``state``."""
    call = Call()
    call._state = state
    call._phase = DONE
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
