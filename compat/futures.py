"""A ``concurrent.futures.Executor`` over any taskrunners runner.

Libraries that accept an executor (``loop.run_in_executor``, ``concurrent.futures``
helpers, ...) can use any runner through it:

>>> from taskrunners.compat.futures import RunnerExecutor
>>> from taskrunners.sync import ConcurrentTaskRunner
>>> with RunnerExecutor(ConcurrentTaskRunner(max_workers=2)) as executor:
...     list(executor.map(pow, [2, 3], [5, 2]))
[32, 9]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from typing import Any, Callable, Optional

from taskrunners._core.base import BlockingTaskRunner
from taskrunners._core.calls import is_coroutine_function
from taskrunners.futures import TaskRun
from taskrunners.states import Completed, Failed, State

__all__ = ["RunnerExecutor"]


class _Call:
    """``fn(*args, **kwargs)`` as a run_fn: its value or exception as a State.

    A small picklable object, so it reaches worker processes and clusters.
    """

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __getstate__(self) -> tuple:
        return (self.fn, self.args, self.kwargs)

    def __setstate__(self, state: tuple) -> None:
        self.fn, self.args, self.kwargs = state

    def __call__(self) -> State:
        try:
            return Completed(data=self.fn(*self.args, **self.kwargs))
        except Exception as exc:
            return Failed(data=exc, message=f"{type(exc).__name__}: {exc}")


class _AsyncCall(_Call):
    __slots__ = ()

    async def __call__(self) -> State:
        try:
            return Completed(data=await self.fn(*self.args, **self.kwargs))
        except Exception as exc:
            return Failed(data=exc, message=f"{type(exc).__name__}: {exc}")


class RunnerExecutor(concurrent.futures.Executor):
    """Submit plain calls to a runner through the ``concurrent.futures`` interface.

    :param runner: an unstarted runner: a blocking twin from :mod:`taskrunners.sync`,
        or a facade instance from :mod:`taskrunners`, driven through its blocking twin
    :raises TypeError: if ``runner`` is not a taskrunners runner

    The runner is started on first use and its ``start()`` block ends on
    :meth:`shutdown`. A call's future holds ``fn``'s value, or the exception it
    raised; a crashed call (a dead worker, an interrupt) sets the crash's exception.
    """

    def __init__(self, runner: Any) -> None:
        core = getattr(runner, "_core", runner)
        if not isinstance(core, BlockingTaskRunner):
            raise TypeError(
                f"RunnerExecutor needs a taskrunners runner, got {type(runner).__name__}; "
                "pass e.g. taskrunners.sync.ConcurrentTaskRunner()."
            )
        self.runner = runner
        self._core = core
        self._lock = threading.Lock()
        self._block: Optional[contextlib.ExitStack] = None
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` on the runner.

        :raises RuntimeError: after :meth:`shutdown`
        """
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._block is None:
                block = contextlib.ExitStack()
                block.enter_context(self._core.start())
                self._block = block
        run_fn = (_AsyncCall if is_coroutine_function(fn) else _Call)(fn, args, kwargs)
        name = getattr(fn, "__name__", type(fn).__name__)
        call = self._core._submit_call(TaskRun(name=name), run_fn, {})
        result: concurrent.futures.Future = concurrent.futures.Future()
        result.add_done_callback(lambda done: done.cancelled() and call.cancel())
        call.add_done_callback(lambda done: _deliver(self._core, done, result))
        return result

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """End the runner's ``start()`` block.

        :param wait: wait for every submitted call before returning
        :param cancel_futures: cancel calls that have not started
        """
        with self._lock:
            self._shutdown = True
            block, self._block = self._block, None
        if block is None:
            return
        if cancel_futures:
            self._core._cancel_pending()
        if wait:
            block.close()
        else:
            threading.Thread(target=block.close, name=f"{self._core}-shutdown", daemon=True).start()


def _deliver(core: BlockingTaskRunner, call: Any, result: concurrent.futures.Future) -> None:
    if call.cancelled():
        result.cancel()
    if result.cancelled():
        return
    state = core._state_of_done(call)
    exc = state.data
    if not isinstance(exc, BaseException):
        exc = RuntimeError(state.message or f"The call ended in state {state.name!r}.")
    # The caller may cancel ``result`` at any moment; then there is nothing to set.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if state.is_completed():
            result.set_result(state.data)
        else:
            result.set_exception(exc)
