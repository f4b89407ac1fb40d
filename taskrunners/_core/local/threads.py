"""The blocking ConcurrentTaskRunner: plain calls on threads, coroutine calls on one loop."""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Dict, Optional

from taskrunners._core.arguments import check_max_workers
from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType
from taskrunners._core.limits import Limited
from taskrunners._core.local.loop_thread import LoopThread
from taskrunners._core.local.thread_pool import ThreadPool
from taskrunners._core.running import is_coroutine_function, run_to_state
from taskrunners._core.settings import Setting
from taskrunners._core.futures import TaskRun

__all__ = ["ConcurrentTaskRunner"]

# With no max_workers, the pool grows by one thread whenever every thread is busy
# (idle threads are reused first), so sleeping calls never starve each other.
_UNBOUNDED_THREADS = 2**31 - 1


class ConcurrentTaskRunner(BlockingTaskRunner):
    """Runs plain calls in a thread pool and coroutine calls on one event loop.

    >>> from taskrunners.states import Completed
    >>> with ConcurrentTaskRunner(max_workers=4).start() as runner:
    ...     future = runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {"x": 21})
    ...     runner.wait(future).result()
    42

    :param max_workers: the most threads running plain calls at once; None for no
        fixed bound (a new thread whenever all are busy)
    :raises ValueError: if ``max_workers`` is not a positive integer or None

    Calls share memory with the code that submits them, as in every thread pool: a
    call sees a change made to a mutable argument after ``submit``, up to the moment
    it reads it. (The process-based runners give each call its arguments as they were
    at ``submit``.) Each call sees a copy of the submitting thread's context
    variables, taken at submit time. Plain calls hold the GIL while they run Python
    code, so threads speed up waiting (I/O, sleeps, C code that releases the GIL),
    not pure-Python computation.

    A plain call with a time limit is interrupted in its thread at the limit (an
    exception Python raises there when the thread next runs Python code) and is
    TimedOut at once; a thread blocked in C is left behind and no longer counts
    against ``max_workers``. A coroutine call with a limit is cancelled.
    """

    max_workers: Setting[Optional[int]] = Setting("The most threads running plain calls; None for no bound.")

    _handles = ("_pool", "_loop_thread")

    def __init__(self, max_workers: Optional[int] = None) -> None:
        check_max_workers(max_workers)
        self.max_workers = max_workers
        self._pool: Optional[ThreadPool] = None
        self._loop_thread: Optional[LoopThread] = None
        super().__init__()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.CONCURRENT

    def _open(self) -> None:
        self._pool = ThreadPool(self.max_workers or _UNBOUNDED_THREADS, name=f"{self}-worker")

    def _close(self) -> None:
        self._release(cancel=False)

    def _abort(self, exc: BaseException) -> None:
        self._cancel_pending()
        self._release(cancel=True)

    def _release(self, cancel: bool) -> None:
        pool, loop_thread = self._pool, self._loop_thread
        self._pool = self._loop_thread = None
        if loop_thread is not None:
            loop_thread.stop(cancel=cancel)
        if pool is not None:
            # After an exception, running threads are not waited for.
            pool.shutdown(wait=not cancel, cancel=cancel)

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> Any:
        if is_coroutine_function(run_fn):
            return self._coroutine_loop().submit(run_fn, run_kwargs, task_run.name)
        pool = self._pool
        if pool is None:
            raise self._not_started()
        context = contextvars.copy_context()
        if type(run_fn) is Limited:
            return pool.submit_limited(context.run, run_fn, run_kwargs, task_run.name)
        return pool.submit(context.run, run_to_state, run_fn, run_kwargs)

    def _coroutine_loop(self) -> LoopThread:
        loop_thread = self._loop_thread
        if loop_thread is None:
            with self._lifecycle_lock:
                if self._loop_thread is None:
                    self._loop_thread = LoopThread(name=f"{self}-loop")
                loop_thread = self._loop_thread
        return loop_thread
