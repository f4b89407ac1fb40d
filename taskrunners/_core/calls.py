"""Running one call to a State, and waiting for calls without holding a thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from typing import Any, Callable, Dict, Optional, Sequence

import anyio
import sniffio

from taskrunners.states import Crashed, State, exception_to_crashed_state

TIMEOUT_ERRORS = (concurrent.futures.TimeoutError, TimeoutError, asyncio.TimeoutError)


def is_coroutine_function(fn: Any) -> bool:
    code = getattr(fn, "__code__", None)
    if code is not None:  # a plain function: read the flag directly, it's on the hot path
        return bool(code.co_flags & inspect.CO_COROUTINE)
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)
    )


class Call:
    """The outcome of one in-process call: a light ``concurrent.futures.Future`` stand-in.

    Its State is set once, from any thread; ``result`` blocks for it and
    ``add_done_callback`` runs a function once it is there. A call not yet running
    can be cancelled: it then ends Crashed with the cancellation message, and
    :meth:`set_running` tells the worker not to run it.
    """

    __slots__ = ("_state", "_running", "_cancelled", "_callbacks", "_lock", "_finished")

    def __init__(self) -> None:
        self._state: Optional[State] = None
        self._running = False
        self._cancelled = False
        self._callbacks: Optional[list] = []
        self._lock = threading.Lock()
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
            if self._state is not None:
                return False
            self._running = True
            return True

    def cancel(self) -> bool:
        """Cancel the call if it has not started; as ``concurrent.futures.Future.cancel``."""
        with self._lock:
            if self._running or self._state is not None:
                return self._cancelled
            self._cancelled = True
        self.set_result(exception_to_crashed_state(concurrent.futures.CancelledError()))
        return True

    def set_result(self, state: State) -> None:
        with self._lock:
            if self._state is not None:
                return
            self._state = state
            callbacks, self._callbacks = self._callbacks, None
            if self._finished is not None:
                self._finished.set()
        for callback in callbacks:
            callback(self)

    def result(self, timeout: Optional[float] = None) -> State:
        if self._state is None:
            with self._lock:
                if self._state is None and self._finished is None:
                    self._finished = threading.Event()
            if self._state is None and not self._finished.wait(timeout):
                raise TimeoutError
        return self._state

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        with self._lock:
            if self._state is None:
                self._callbacks.append(fn)
                return
        fn(self)


def checked_state(run_fn: Any, value: Any) -> State:
    if isinstance(value, State):
        return value
    name = getattr(run_fn, "__qualname__", None) or type(run_fn).__name__
    return Crashed(
        message=f"run_fn {name!r} returned {type(value).__name__}, not a State; "
        "return a State, e.g. `Completed(data=value)`.",
        data=TypeError(f"run_fn {name!r} must return a State, got {type(value).__name__}"),
    )


def run_to_state(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]) -> State:
    """Call a plain ``run_fn``; whatever it raises becomes a Crashed state."""
    try:
        value = run_fn(**run_kwargs)
    except BaseException as exc:
        return exception_to_crashed_state(exc)
    return checked_state(run_fn, value)


async def arun_to_state(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]) -> State:
    """Await a coroutine ``run_fn``; whatever it raises becomes a Crashed state."""
    try:
        value = await run_fn(**run_kwargs)
    except BaseException as exc:
        return exception_to_crashed_state(exc)
    return checked_state(run_fn, value)


def run_anywhere(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]) -> State:
    """Run a plain or coroutine ``run_fn`` to a State in a thread with no event loop.

    Used inside worker processes, where a coroutine gets an event loop of its own.
    """
    if is_coroutine_function(run_fn):
        try:
            return asyncio.run(arun_to_state(run_fn, run_kwargs))
        except BaseException as exc:
            return exception_to_crashed_state(exc)
    return run_to_state(run_fn, run_kwargs)


def done_call(state: State) -> Call:
    call = Call()
    call._state = state
    return call


def settle(call: concurrent.futures.Future, state: State) -> None:
    """Set a call's State unless it was cancelled meanwhile."""
    try:
        call.set_result(state)
    except concurrent.futures.InvalidStateError:
        pass


def _loop_waker() -> Callable[[Callable[[], Any]], None]:
    """A function that runs a callable on the current event loop from any thread."""
    loop_thread = threading.get_ident()
    if sniffio.current_async_library() == "trio":
        import trio

        schedule = trio.lowlevel.current_trio_token().run_sync_soon
    else:
        schedule = asyncio.get_running_loop().call_soon_threadsafe

    def wake(fn: Callable[[], Any]) -> None:
        if threading.get_ident() == loop_thread:
            fn()
            return
        try:
            schedule(fn)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    return wake


async def wait_until_done(call: Any, timeout: Optional[float]) -> bool:
    """Wait, without a thread, until ``call`` is done; False if ``timeout`` passed first.

    ``call`` is anything with ``done()`` and ``add_done_callback(fn)``.
    """
    if call.done():
        return True
    event = anyio.Event()
    wake = _loop_waker()
    call.add_done_callback(lambda _: wake(event.set))
    with anyio.move_on_after(timeout):
        await event.wait()
    return call.done()


def when_all_done(calls: Sequence[Any], then: Callable[[], Any]) -> None:
    """Call ``then()`` once every call in ``calls`` is done (at once if none is pending).

    It runs in the thread that finishes the last call, so it must not block.
    """
    remaining = [len(calls)]
    if not calls:
        then()
        return
    lock = threading.Lock()

    def one_done(_: Any) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        then()

    for call in calls:
        call.add_done_callback(one_done)


def block_until_done(calls: Any) -> None:
    """Block the calling thread until every call in ``calls`` is done."""
    for call in calls:
        if not call.done():
            finished = threading.Event()
            call.add_done_callback(lambda _, event=finished: event.set())
            finished.wait()
