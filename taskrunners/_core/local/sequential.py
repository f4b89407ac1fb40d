"""The blocking SequentialTaskRunner: each call runs inside ``submit``."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional

from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType
from taskrunners._core.calls import Call, block_until_done, done_call
from taskrunners._core.limits import CallTimedOut, split_limit
from taskrunners._core.local.interrupts import sigint_watch
from taskrunners._core.local.limited import main_alarm, run_in_main_thread, run_on_helper_thread
from taskrunners._core.local.loop_thread import LoopThread
from taskrunners._core.running import is_coroutine_function, run_to_state
from taskrunners._core.futures import TaskRun
from taskrunners.states import State

__all__ = ["SequentialTaskRunner"]


class SequentialTaskRunner(BlockingTaskRunner):
    """Runs each call to completion inside ``submit``, one at a time.

    >>> from taskrunners.states import Completed
    >>> with SequentialTaskRunner().start() as runner:
    ...     future = runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {"x": 21})
    ...     runner.wait(future).result()
    42

    Calls submitted from several threads run one after another. A coroutine
    ``run_fn`` runs on an event loop in a thread the runner owns, so this works from
    a thread that is itself running a loop. A Ctrl-C while a call runs in the main
    thread ends that call Crashed and then raises KeyboardInterrupt out of ``submit``,
    so the script stops; a ``run_fn`` that raises KeyboardInterrupt itself only gives
    a Crashed state. A plain call with a time limit is interrupted at the limit by a
    signal (``SIGALRM``) in the main thread, where nothing else handles it; in
    another thread it runs on a helper thread, interrupted when it next runs Python
    code and left behind if it is blocked in C (its State is TimedOut at the limit).
    """

    _handles = ("_call_lock", "_loop_thread", "_watching", "_alarm")
    _usable_after_pickling = True

    def __init__(self) -> None:
        super().__init__()
        self._call_lock: Optional[threading.RLock] = None
        self._loop_thread: Optional[LoopThread] = None
        self._watching = False
        self._alarm = False

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.SEQUENTIAL

    def _open(self) -> None:
        self._call_lock = threading.RLock()
        self._watching = sigint_watch.install()

    def _close(self) -> None:
        self._release(cancel=False)

    def _abort(self, exc: BaseException) -> None:
        self._release(cancel=True)

    def _release(self, cancel: bool) -> None:
        if self._watching:
            self._watching = False
            sigint_watch.uninstall()
        if self._alarm:
            self._alarm = False
            main_alarm.uninstall()
        if self._loop_thread is not None:
            self._loop_thread.stop(cancel=cancel)
            self._loop_thread = None

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> Call:
        if self._call_lock is None:  # unpickled while started: handles were dropped
            self._call_lock = threading.RLock()
        with self._call_lock:
            if is_coroutine_function(run_fn):
                loop = self._coroutine_loop()
                return done_call(loop.submit(run_fn, run_kwargs, task_run.name).result())
            inner, seconds = split_limit(run_fn)
            if seconds is not None:
                state = self._run_limited(inner, run_kwargs, seconds, task_run.name)
            elif sigint_watch.watching:
                state = sigint_watch.run_plain(run_fn, run_kwargs)
            else:
                state = run_to_state(run_fn, run_kwargs)
        if type(state.data) is CallTimedOut:
            # The limit of the code around the call (a flow's) passed while it ran: the
            # call is Crashed, and the interruption goes on to that code, as a Ctrl-C does.
            raise state.data
        return done_call(state)

    def _run_limited(
        self, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], seconds: float, name: str
    ) -> State:
        """A plain call with a limit: in the main thread interrupted by a signal (and
        under the Ctrl-C watch), elsewhere on a helper thread it can leave behind."""
        if not self._alarm and self._started:  # the block's first call with a limit
            self._alarm = main_alarm.install()
        if not main_alarm.usable:
            return run_on_helper_thread(run_fn, run_kwargs, seconds, name)
        if not sigint_watch.watching:
            return run_in_main_thread(run_fn, run_kwargs, seconds, name)

        def run(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]) -> State:
            return run_in_main_thread(run_fn, run_kwargs, seconds, name)

        return sigint_watch.run_plain(run_fn, run_kwargs, run)

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> Call:
        # Sequential means the call runs inside submit: wait for upstream calls here.
        block_until_done(upstream)
        return self._dispatch(task_run, run_fn, self._resolve_futures(run_kwargs))

    def _coroutine_loop(self) -> LoopThread:
        if self._loop_thread is None:
            self._loop_thread = LoopThread(name=f"{self}-loop")
        return self._loop_thread
