"""Running one call to a State: whatever ``run_fn`` returns or raises becomes one."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

from taskrunners._core.limits import CallTimedOut, Limited, ThreadGuard, thread_guard, timed_out_state
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = [
    "is_coroutine_function",
    "checked_state",
    "run_to_state",
    "arun_to_state",
    "run_limited",
    "arun_limited",
]


def is_coroutine_function(fn: Any) -> bool:
    """Whether calling ``fn`` gives a coroutine (functions and callable objects)."""
    if type(fn) is Limited:
        fn = fn.run_fn
    code = getattr(fn, "__code__", None)
    if code is not None:  # a plain function: read the flag directly, it's on the hot path
        return bool(code.co_flags & inspect.CO_COROUTINE)
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)
    )


def checked_state(run_fn: Any, value: Any) -> State:
    """``value`` if it is a State, else a Crashed state saying that run_fn must return one."""
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


def run_limited(
    run_fn: Callable[..., Any],
    run_kwargs: Any,
    seconds: float,
    name: str,
    expire: Callable[[ThreadGuard], object],
) -> State:
    """Run a plain ``run_fn`` in this thread; ``expire(guard)`` runs on the watchdog's
    thread if ``seconds`` pass first (``guard.interrupt()`` raises into the call).

    A call that ends by the interruption is :func:`timed_out_state`.
    """
    guard = thread_guard()
    try:
        guard.arm(seconds, expire)
        try:
            state = run_to_state(run_fn, run_kwargs)
        finally:
            guard.close()
    except CallTimedOut:  # raised between the call's end and close()
        guard.close()
    if guard.fired:
        return timed_out_state(name, seconds)
    return state


async def arun_limited(run_fn: Callable[..., Any], run_kwargs: Any, seconds: float, name: str) -> State:
    """Await a coroutine ``run_fn``, cancelled once ``seconds`` pass (any anyio backend)."""
    import anyio

    with anyio.move_on_after(seconds) as scope:
        state = await arun_to_state(run_fn, run_kwargs)
    # The cancellation may have been caught inside, as a Crashed state.
    if scope.cancelled_caught or (scope.cancel_called and state.is_crashed()):
        return timed_out_state(name, seconds)
    return state
