"""Time limits on the calls of the in-process runners (Sequential, Concurrent).

A plain call runs in a thread of this process, so its limit is enforced here:

- in the main thread (a Sequential call), by a timer signal: ``SIGALRM`` raises
  :class:`~taskrunners._core.limits.CallTimedOut` in the call, which interrupts a
  sleep, a socket read or a busy loop alike (:func:`run_with_timer_signal`);
- in any other thread, by an exception raised into that thread at the limit, which
  Python delivers when the thread next runs Python code: a busy loop stops at once,
  a call blocked in C only when it returns. Its State is TimedOut at the limit all
  the same, and its thread is abandoned: the runner no longer waits for it, and a
  Concurrent pool no longer counts it against ``max_workers``
  (:func:`run_on_helper_thread`, and ``ThreadPool.submit_limited``).
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

from taskrunners._core.calls import Call
from taskrunners._core.limits import (
    CallTimedOut,
    ThreadGuard,
    run_limited,
    timed_out_state,
    watchdog,
)
from taskrunners._core.running import run_to_state
from taskrunners.states import State

__all__ = ["timer_signal_free", "time_limit", "run_with_timer_signal", "run_on_helper_thread"]

_MAIN_THREAD_ID = threading.main_thread().ident


def timer_signal_free() -> bool:
    """Whether this is the main thread and nobody else handles ``SIGALRM``."""
    if threading.get_ident() != _MAIN_THREAD_ID or not hasattr(signal, "setitimer"):
        return False
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)


@contextlib.contextmanager
def time_limit(seconds: float, on_expiry: Optional[Callable[[], object]] = None) -> Iterator[List[bool]]:
    """Raise :class:`~taskrunners._core.limits.CallTimedOut` in this thread's block once
    ``seconds`` pass, calling ``on_expiry()`` first; yields a list that holds True once
    they did.

    In the main thread, where :func:`timer_signal_free`, a timer signal raises it
    (and interrupts a sleep or a read); elsewhere the watchdog raises it into the
    thread when it next runs Python code.
    """
    fired: List[bool] = []
    if timer_signal_free():

        def on_alarm(signum: int, frame: Any) -> None:
            fired.append(True)
            if on_expiry is not None:
                on_expiry()
            raise CallTimedOut

        previous = signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            yield fired
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return
    guard = ThreadGuard()

    def expire() -> None:
        fired.append(True)
        if on_expiry is not None:
            on_expiry()
        guard.interrupt()

    alarm = watchdog().arm(seconds, expire)
    try:
        yield fired
    finally:
        alarm.cancel()
        guard.close()


def run_with_timer_signal(
    run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], seconds: float, name: str
) -> State:
    """Run a plain call in the main thread, interrupted by ``SIGALRM`` at its limit.

    Only where :func:`timer_signal_free` says so; the signal's handler is put back after.
    """
    state: Optional[State] = None
    fired: List[bool] = []
    try:
        with time_limit(seconds) as fired:
            state = run_to_state(run_fn, run_kwargs)
    except CallTimedOut:  # the alarm went off between the call's end and the reset
        pass
    if fired or state is None:
        return timed_out_state(name, seconds)
    return state


def run_on_helper_thread(
    run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], seconds: float, name: str
) -> State:
    """Run a plain call on a thread of its own and wait for it, at most ``seconds``.

    Past the limit the call is interrupted (see the module's notes) and this returns
    its TimedOut state; a thread still blocked is left to end by itself.
    """
    call = Call()

    def expire(guard: ThreadGuard) -> None:
        call.set_result(timed_out_state(name, seconds))
        guard.interrupt()

    context = contextvars.copy_context()

    def work() -> None:
        call.set_result(context.run(run_limited, run_fn, run_kwargs, seconds, name, expire))

    threading.Thread(target=work, name=f"taskrunners-limited-{name}", daemon=True).start()
    return call.result()
