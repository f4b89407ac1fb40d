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

import atexit
import concurrent.futures
import contextlib
import functools
import threading
import time
import weakref
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Coroutine,
    Dict,
    Iterable,
    Iterator,
    Optional,
    TypeVar,
    overload,
)

from typing_extensions import ParamSpec

from taskrunners._core import seam
from taskrunners.compat import _bulk
from taskrunners._core.seam import Memo, TaskRun, all_unchanging, is_coroutine_function, snapshot_each
from taskrunners.states import Completed, Failed, State

__all__ = ["RunnerExecutor"]

P = ParamSpec("P")
T = TypeVar("T")


class _FunctionCall:
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

    def __snapshot__(self, memo: Optional[Memo]) -> "_FunctionCall":
        # For runners that send calls later: the arguments as they are at submit.
        if all_unchanging(self.args) and all_unchanging(self.kwargs.values()):
            return self
        kwargs = dict(zip(self.kwargs, snapshot_each(list(self.kwargs.values()), memo)))
        return type(self)(self.fn, tuple(snapshot_each(self.args, memo)), kwargs)

    def __batch_key__(self, run_kwargs: Dict[str, Any]) -> Any:
        # For batching: every submission is a new instance; the function is the task.
        return self.fn

    def __call__(self) -> State:
        try:
            return Completed(data=self.fn(*self.args, **self.kwargs))
        except Exception as exc:
            return Failed(data=exc, message=f"{type(exc).__name__}: {exc}")


class _AsyncFunctionCall(_FunctionCall):
    __slots__ = ()

    async def __call__(self) -> State:  # type: ignore[override]
        try:
            return Completed(data=await self.fn(*self.args, **self.kwargs))
        except Exception as exc:
            return Failed(data=exc, message=f"{type(exc).__name__}: {exc}")


# The keyword arguments of a call that has none, and every call's run_kwargs: one
# dict, never changed (``fn`` gets its own from ``**``), not an empty one per call.
_NO_KWARGS: Dict[str, Any] = {}

# Executors whose runner is started, kept until shutdown so that their calls still
# pending at interpreter exit finish first, as concurrent.futures promises; and
# whether that exit has begun (submit then refuses).
_open_executors: "set[RunnerExecutor]" = set()
_exiting = False

# Called just before the interpreter joins its non-daemon threads, as the standard
# library's executors do (a private hook, there since Python 3.9), last registered
# first. Each executor registers its own when its runner starts: after its engine
# registered theirs (a ThreadPoolExecutor's, say), so the runner ends before they do.
_register_atexit: Callable[[Callable[[], None]], Any] = getattr(
    threading, "_register_atexit", atexit.register
)


def _mark_exiting() -> None:
    global _exiting
    _exiting = True


def _finish_at_exit(executor_ref: "weakref.ref[RunnerExecutor]") -> None:
    _mark_exiting()
    executor = executor_ref()
    if executor is not None:
        executor.shutdown(wait=True)
        closing = executor._closing
        if closing is not None:
            closing.join()


_register_atexit(_mark_exiting)


class _Future(concurrent.futures.Future):
    """The future of one executor call; ``cancel()`` and ``running()`` ask the call.

    As with ``ThreadPoolExecutor``, a call that has started cannot be cancelled: it
    runs to completion.
    """

    def __init__(self) -> None:
        super().__init__()
        self.call: Any = None

    def running(self) -> bool:
        call = self.call
        return super().running() or (call is not None and not self.done() and call.running())

    def cancel(self) -> bool:
        call = self.call
        if call is not None and not self.done() and not call.cancel():
            return False  # started (or finished this moment): it runs to its end
        return super().cancel()

    def result(self, timeout: Optional[float] = None) -> Any:
        self._expedite()
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._expedite()
        return super().exception(timeout)

    def _expedite(self) -> None:
        call = self.call
        if call is not None:  # waited for: it must not wait to fill a batch
            call.expedite()

    def __call__(self, call: Any) -> None:
        # The call's done callback: one object less per pending call than a closure.
        _deliver(call, self)


class RunnerExecutor(concurrent.futures.Executor):
    """Submit plain calls to a runner through the ``concurrent.futures`` interface.

    :param runner: an unstarted runner: a blocking twin from :mod:`taskrunners.sync`,
        or a facade instance from :mod:`taskrunners`, driven through its blocking twin
    :param call_timeout: the most seconds each call may run (from its start); past it
        the work is stopped and its future's exception is a ``TimeoutError``. With
        :meth:`map`, each item is then a runner call of its own. None: no limit
    :raises TypeError: if ``runner`` is not a taskrunners runner, or ``call_timeout``
        not a number
    :raises ValueError: if ``call_timeout`` is not positive

    The runner is started on first use and its ``start()`` block ends on
    :meth:`shutdown`. A call's future holds ``fn``'s value, or the exception it
    raised; a crashed call (a dead worker, an interrupt) sets the crash's exception.

    As with the standard library's executors, a call that has started cannot be
    cancelled (``cancel()`` returns False and it runs to completion),
    ``shutdown(cancel_futures=True)`` cancels every call that has not started, and
    calls still pending when the interpreter exits finish first, whether or not
    :meth:`shutdown` was called.
    """

    def __init__(self, runner: Any, call_timeout: Optional[float] = None) -> None:
        self.call_timeout = seam.check_timeout(call_timeout, "call_timeout")
        try:
            core = seam.core_of(runner)
        except TypeError:
            raise TypeError(
                f"RunnerExecutor needs a taskrunners runner, got {type(runner).__name__}; "
                "pass e.g. taskrunners.sync.ConcurrentTaskRunner()."
            ) from None
        self.runner = runner
        self._core = core
        self._lock = threading.Lock()
        self._block: Optional[contextlib.ExitStack] = None
        self._closing: Optional[threading.Thread] = None
        self._shutdown = False
        self._maps: "weakref.WeakSet[_bulk.MapRun]" = weakref.WeakSet()

    def _refusal(self) -> Optional[str]:
        if _exiting:
            return "cannot schedule new futures after interpreter shutdown"
        if self._shutdown:
            return "cannot schedule new futures after shutdown"
        return None

    def _ensure_started(self) -> None:
        with self._lock:
            reason = self._refusal()
            if reason is not None:
                raise RuntimeError(reason)
            if self._block is None:
                block = contextlib.ExitStack()
                block.enter_context(self._core.start())
                self._block = block
                _open_executors.add(self)
                with contextlib.suppress(RuntimeError):  # the interpreter is exiting already
                    _register_atexit(functools.partial(_finish_at_exit, weakref.ref(self)))

    # A coroutine function's call is awaited on the runner: its future holds the value.
    @overload
    def submit(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]: ...

    @overload
    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]: ...

    def submit(
        self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on the runner; the future holds its value.

        :raises RuntimeError: after :meth:`shutdown`
        """
        self._ensure_started()
        run_fn: Callable[..., Any] = (
            _AsyncFunctionCall if is_coroutine_function(fn) else _FunctionCall
        )(fn, args, kwargs or _NO_KWARGS)
        name = getattr(fn, "__name__", type(fn).__name__)
        if self.call_timeout is not None:
            run_fn = seam.with_limit(run_fn, self.call_timeout, shared=False)
        call = seam.call_of(seam.submit(self._core, TaskRun(name=name), run_fn, _NO_KWARGS))
        future = _Future()
        future.call = call
        call.add_done_callback(future)  # the future is its call's done callback
        return future

    # A coroutine function's calls are awaited on the runner: the results are the values.
    @overload
    def map(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
    ) -> Iterator[T]: ...

    @overload
    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
    ) -> Iterator[T]: ...

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
    ) -> Iterator[Any]:
        """``fn(*args)`` for each ``args`` of ``zip(*iterables)``; the values in order.

        As the standard library's ``Executor.map``, but items go to the runner in
        chunks, one runner call each, with no future per item. Leaving the iteration
        early (or an exception) cancels the chunks that have not started.

        :param timeout: seconds from this call after which getting the next value
            raises ``concurrent.futures.TimeoutError``; None for no limit
        :param chunksize: items per runner call; None sizes chunks from how long items
            take (about 0.1 s each, starting with one item), as ``batch_size="auto"``
        :param buffersize: read the iterables lazily, keeping at most this many chunks
            (with an int ``chunksize``) or items (with None) submitted ahead of the
            consumer, as Python 3.14's ``buffersize``; None reads every item now
        :return: an iterator over the values; an item's exception is raised when its
            turn comes, after the values of the items before it
        :raises RuntimeError: after :meth:`shutdown`
        :raises TypeError, ValueError: for a ``chunksize`` or ``buffersize`` not an
            integer of 1 or more
        """
        end_time = None if timeout is None else timeout + time.monotonic()
        return _bulk.results(self._map_run(fn, iterables, chunksize, buffersize), end_time)

    # A coroutine function's calls are awaited on the runner: the results are the values.
    @overload
    def amap(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
    ) -> AsyncIterator[T]: ...

    @overload
    def amap(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
    ) -> AsyncIterator[T]: ...

    def amap(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        buffersize: Optional[int] = None,
    ) -> AsyncIterator[Any]:
        """:meth:`map` for async code (asyncio or trio): ``async for`` over the values.

        Waiting for a chunk holds no thread; the arguments and the rules are those of
        :meth:`map`. Submitting happens in the caller's thread (on the Sequential
        runner, items then run there).

        >>> import anyio
        >>> from taskrunners.sync import ConcurrentTaskRunner
        >>> async def main():
        ...     with RunnerExecutor(ConcurrentTaskRunner(max_workers=2)) as executor:
        ...         return [value async for value in executor.amap(pow, [2, 3], [5, 2])]
        >>> anyio.run(main)
        [32, 9]
        """
        end_time = None if timeout is None else timeout + time.monotonic()
        return _bulk.aresults(self._map_run(fn, iterables, chunksize, buffersize), end_time)

    def _map_run(
        self,
        fn: Callable[..., Any],
        iterables: tuple,
        chunksize: Optional[int],
        buffersize: Optional[int],
    ) -> _bulk.MapRun:
        _bulk.check_sizes(chunksize, buffersize)
        self._ensure_started()
        run = _bulk.MapRun(
            self._core, fn, iterables, chunksize, buffersize, self._refusal, self.call_timeout
        )
        self._maps.add(run)
        return run

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
            for run in list(self._maps):
                run.close()
            seam.cancel_pending(self._core)
        if wait:
            self._close(block)
            return
        # Not a daemon: the interpreter waits for it at exit, so pending calls finish.
        self._closing = threading.Thread(
            target=self._close, args=(block,), name=f"{self._core}-shutdown"
        )
        self._closing.start()

    def _close(self, block: contextlib.ExitStack) -> None:
        try:
            for run in list(self._maps):  # a map's chunks not sent yet are submitted first
                run.fed.wait()
            block.close()
        finally:
            _open_executors.discard(self)


def _deliver(call: Any, result: _Future) -> None:
    result.call = None  # the finished call's State is not kept beyond the result
    if call.cancelled():
        result.cancel()
    if result.cancelled():
        # What an executor's worker does with a cancelled item: concurrent.futures.wait()
        # and as_completed() count a cancelled future as done only once notified.
        result.set_running_or_notify_cancel()
        return
    state = seam.state_of_done(call)
    exc = state.data
    if not isinstance(exc, BaseException):
        exc = RuntimeError(state.message or f"The call ended in state {state.name!r}.")
    # The caller may cancel ``result`` at any moment; then there is nothing to set.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if state.is_completed():
            result.set_result(state.data)
        else:
            result.set_exception(exc)
