"""Telling a Ctrl-C apart from a call's own KeyboardInterrupt, for the Sequential runner.

A Sequential call runs in the thread that submits it, usually the main thread, where
Python delivers SIGINT. A call that raises KeyboardInterrupt itself only ends Crashed,
but a Ctrl-C must stop the script. While a :class:`SigintWatch` is installed, a
SIGINT that lands during a plain call raises KeyboardInterrupt right there (as
Python's default handler does, even under an event loop whose own handler would only
cancel a task and let the call run on) and is counted, so the runner can end the call
Crashed and then re-raise. Outside calls, and during coroutine calls,
the handler installed before decides, as if the watch were not there.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Dict, Optional

from taskrunners._core.running import run_to_state
from taskrunners.states import State

__all__ = ["SigintWatch", "sigint_watch"]

_MAIN_THREAD_ID = threading.main_thread().ident


class SigintWatch:
    """The process's SIGINT handler while Sequential runners are started in the main thread."""

    def __init__(self) -> None:
        self.signals = 0  # SIGINTs seen while installed
        self._plain_calls = 0  # plain calls running in the main thread now
        self._installs = 0
        self._previous: Any = None

    @property
    def watching(self) -> bool:
        """Installed, and asked from the main thread (the only one that gets signals)."""
        return self._installs > 0 and threading.get_ident() == _MAIN_THREAD_ID

    def install(self) -> bool:
        """Install in the main thread, unless SIGINT is ignored; False if not installed."""
        if threading.get_ident() != _MAIN_THREAD_ID:
            return False
        if self._installs == 0:
            previous = signal.getsignal(signal.SIGINT)
            if not callable(previous):  # SIG_IGN, SIG_DFL, or not set from Python
                return False
            self._previous = previous
            signal.signal(signal.SIGINT, self._handle)
        self._installs += 1
        return True

    def uninstall(self) -> None:
        """Undo one :meth:`install`; the last one restores the previous handler.

        Only the main thread can set a handler: from another one (a block closed by
        another thread) the watch stays in place, doing what the previous handler does.
        """
        if self._installs == 1 and threading.get_ident() != _MAIN_THREAD_ID:
            return
        self._installs -= 1
        if self._installs == 0:
            # Someone may have put their own handler in place meanwhile: keep theirs.
            if signal.getsignal(signal.SIGINT) == self._handle:
                signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signals += 1
        if self._plain_calls:
            raise KeyboardInterrupt
        self._previous(signum, frame)

    def run_plain(
        self,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        run: Callable[[Callable[..., Any], Dict[str, Any]], State] = run_to_state,
    ) -> State:
        """Run a plain call in the main thread, with ``run`` (``run_to_state`` or one
        that keeps a limit); re-raise a SIGINT that landed meanwhile."""
        signals = self.signals
        self._plain_calls += 1
        try:
            state = run(run_fn, run_kwargs)
        finally:
            self._plain_calls -= 1
        if self.signals != signals:
            # The call is Crashed ("aborted by an interrupt signal"); the script stops.
            raise KeyboardInterrupt
        return state


#: The one watch of this process (signal handlers are process-wide).
sigint_watch = SigintWatch()


def interrupted_since(signals: Optional[int]) -> bool:
    """Whether a SIGINT arrived since :attr:`SigintWatch.signals` read ``signals``."""
    return signals is not None and sigint_watch.signals != signals
