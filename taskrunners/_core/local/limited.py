"""Time limits on the calls of the in-process runners (Sequential, Concurrent).

A plain call runs in a thread of this process, so its limit is enforced here:

- in the main thread (a Sequential call, a flow's body), by a signal: the watchdog
  sends ``SIGALRM``, whose handler raises
  :class:`~taskrunners._core.limits.CallTimedOut` in the call, which interrupts a
  sleep, a socket read or a busy loop alike (:class:`MainThreadAlarm`,
  :func:`run_in_main_thread`, :func:`time_limit`); only where nothing else handles
  ``SIGALRM`` (pytest-timeout does, for one);
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
from taskrunners._core.limits import CallTimedOut, ThreadGuard, timed_out_state
from taskrunners._core.running import run_limited
from taskrunners.states import State

__all__ = ["MainThreadAlarm", "main_alarm", "time_limit", "run_in_main_thread", "run_on_helper_thread"]

_MAIN_THREAD_ID = threading.main_thread().ident


class MainThreadAlarm:
    """``SIGALRM`` as the way to interrupt the main thread, for whoever needs it there.

    Its handler is installed while anyone uses it (:meth:`install`), and only where
    nothing else handles ``SIGALRM``. :meth:`fire`, from any thread, makes the main
    thread raise :class:`~taskrunners._core.limits.CallTimedOut` where it is, which
    interrupts a sleep or a read too; :meth:`settle` withdraws a fire not yet raised.
    """

    def __init__(self) -> None:
        self._installs = 0
        self._previous: Any = None
        self._raising = False

    @property
    def usable(self) -> bool:
        """Installed, and asked from the main thread."""
        return self._installs > 0 and threading.get_ident() == _MAIN_THREAD_ID

    def install(self) -> bool:
        """Install the handler (from the main thread); False where it cannot be."""
        if threading.get_ident() != _MAIN_THREAD_ID or not hasattr(signal, "pthread_kill"):
            return False
        if self._installs == 0:
            previous = signal.getsignal(signal.SIGALRM)
            if previous not in (signal.SIG_DFL, None):  # somebody else's
                return False
            self._previous = previous
            signal.signal(signal.SIGALRM, self._handle)
        self._installs += 1
        return True

    def uninstall(self) -> None:
        """Undo one :meth:`install` (from the main thread; elsewhere it stays)."""
        if threading.get_ident() != _MAIN_THREAD_ID:
            return
        self._installs -= 1
        if self._installs == 0 and signal.getsignal(signal.SIGALRM) == self._handle:
            signal.signal(signal.SIGALRM, self._previous)

    def in_place(self) -> bool:
        """Whether the handler is still the one in place (from any thread)."""
        return signal.getsignal(signal.SIGALRM) == self._handle

    def fire(self) -> None:
        self._raising = True
        signal.pthread_kill(_MAIN_THREAD_ID, signal.SIGALRM)  # type: ignore[arg-type]

    def settle(self) -> None:
        self._raising = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._raising:
            self._raising = False
            raise CallTimedOut


#: The one of this process (signal handlers are process-wide).
main_alarm = MainThreadAlarm()


def _expire_in_main(guard: ThreadGuard) -> None:
    if main_alarm.in_place():
        guard.interrupt(main_alarm.fire, main_alarm.settle)
    else:  # somebody put their own handler in place meanwhile: leave it alone
        guard.interrupt()


@contextlib.contextmanager
def time_limit(seconds: float, on_expiry: Optional[Callable[[], object]] = None) -> Iterator[List[bool]]:
    """Raise :class:`~taskrunners._core.limits.CallTimedOut` in this thread's block once
    ``seconds`` pass, calling ``on_expiry()`` first; yields a list that holds True once
    they did.

    In the main thread, where the :data:`main_alarm` can be installed, a signal raises
    it (and interrupts a sleep or a read); elsewhere the watchdog raises it into the
    thread when it next runs Python code.
    """
    fired: List[bool] = []
    in_main = main_alarm.install()
    guard = ThreadGuard()  # its own: the block may run calls with limits of their own here

    def expire(guard: ThreadGuard) -> None:
        fired.append(True)
        if on_expiry is not None:
            on_expiry()
        if in_main:
            _expire_in_main(guard)
        else:
            guard.interrupt()

    try:
        guard.arm(seconds, expire)
        try:
            yield fired
        finally:
            guard.close()
    finally:
        if in_main:
            main_alarm.uninstall()


def run_in_main_thread(
    run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], seconds: float, name: str
) -> State:
    """Run a plain call in the main thread, interrupted by ``SIGALRM`` at its limit.

    Only where :attr:`MainThreadAlarm.usable` (the caller installed it).
    """
    return run_limited(run_fn, run_kwargs, seconds, name, _expire_in_main)


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
