"""Task runs, the futures a runner hands back for them, and waiting for several.

:class:`PrefectFuture` is the handle to one submitted call. :func:`wait` and
:func:`as_completed` take futures from any runner, as :func:`concurrent.futures.wait`
and :func:`concurrent.futures.as_completed` sit beside ``Future``. Each has a
blocking and an awaited form. In type hints a future carries the type of its call's
result and its mode: ``PrefectFuture[int, Sync]`` (the blocking twins', a sync
flow's) or ``PrefectFuture[int, Async]`` (the facade's, an async flow's); the mode
may be left out (``PrefectFuture[int]``) when it is not known.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import threading
import time
from typing import (
    Any,
    AsyncIterator,
    Coroutine,
    Deque,
    Generic,
    Iterable,
    Iterator,
    List,
    Optional,
    Set,
    TypeVar,
    Union,
    overload,
)

from typing_extensions import NamedTuple
from typing_extensions import TypeVar as DefaultTypeVar

from taskrunners._core.seam import (
    Async,
    PrefectFuture,
    RunFn,
    Sync,
    TaskRun,
    call_of,
    in_event_loop,
    wait_until_done,
)

__all__ = [
    "TaskRun",
    "PrefectFuture",
    "Sync",
    "Async",
    "RunFn",
    "wait",
    "as_completed",
    "DoneAndNotDone",
]

#: Whether futures block (:class:`Sync`) or are awaited (:class:`Async`); Any when
#: left out, as in ``DoneAndNotDone[int]``.
M = DefaultTypeVar("M", bound=Union[Sync, Async], default=Any)
#: A result type, in functions over futures.
T = TypeVar("T")



class DoneAndNotDone(NamedTuple, Generic[T, M]):
    """What :func:`wait` returns: the futures done, and those not done, as sets."""

    done: Set[PrefectFuture[T, M]]
    not_done: Set[PrefectFuture[T, M]]


class _Completions:
    """Collects futures as their calls finish; waited on by threads and event loops."""

    def __init__(self, futures: Iterable[PrefectFuture[Any]]) -> None:
        self.futures = list(dict.fromkeys(futures))
        # Every future is checked before any callback is added.
        self.calls = [call_of(future) for future in self.futures]
        self.unreported = len(self.futures)
        self._lock = threading.Lock()
        self._finished: Deque[PrefectFuture[Any]] = collections.deque()
        self._signal: concurrent.futures.Future[None] = concurrent.futures.Future()
        for future, call in zip(self.futures, self.calls):
            call.add_done_callback(functools.partial(self._arrive, future))
        for call in self.calls:  # waited for: none may wait to fill a batch
            call.expedite()

    def _arrive(self, future: PrefectFuture[Any], _: object) -> None:
        with self._lock:
            self._finished.append(future)
            signal = self._signal
        try:
            signal.set_result(None)
        except concurrent.futures.InvalidStateError:
            pass

    def pop(self) -> Union[PrefectFuture[Any], concurrent.futures.Future[None], None]:
        """A finished future not reported yet, None once all are; else a signal.

        The signal is set when the next future finishes.
        """
        with self._lock:
            if self._finished:
                self.unreported -= 1
                return self._finished.popleft()
            if not self.unreported:
                return None
            if self._signal.done():
                self._signal = concurrent.futures.Future()
            return self._signal

    def done_and_not_done(self) -> DoneAndNotDone[Any, Any]:
        done = {future for future, call in zip(self.futures, self.calls) if call.done()}
        return DoneAndNotDone(done, set(self.futures) - done)

    def timeout_error(self) -> TimeoutError:
        return TimeoutError(f"{self.unreported} (of {len(self.futures)}) futures unfinished.")


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _AsCompleted(Generic[T, M]):
    """Futures in the order they finish, by ``for`` (blocking) or ``async for``."""

    def __init__(self, futures: Iterable[PrefectFuture[T, M]], timeout: Optional[float]) -> None:
        self._completions = _Completions(futures)
        self.futures: List[PrefectFuture[T, M]] = self._completions.futures
        self._deadline = _deadline(timeout)

    def done_and_not_done(self) -> DoneAndNotDone[T, M]:
        return self._completions.done_and_not_done()

    def __iter__(self) -> Iterator[PrefectFuture[T, M]]:
        if in_event_loop() and any(f.asynchronous for f in self.futures):
            # Blocking here could starve the calls that run on this very loop.
            raise RuntimeError(
                "as_completed() was iterated with `for` inside an event loop over "
                "asynchronous futures; use `async for future in as_completed(...)`."
            )
        return self

    def __next__(self) -> PrefectFuture[T, M]:
        while True:
            found = self._completions.pop()
            if found is None:
                raise StopIteration
            if isinstance(found, PrefectFuture):
                return found
            if not concurrent.futures.wait([found], _remaining(self._deadline)).done:
                raise self._completions.timeout_error()

    def __aiter__(self) -> AsyncIterator[PrefectFuture[T, M]]:
        return self

    async def __anext__(self) -> PrefectFuture[T, M]:
        while True:
            found = self._completions.pop()
            if found is None:
                raise StopAsyncIteration
            if isinstance(found, PrefectFuture):
                return found
            if not await wait_until_done(found, _remaining(self._deadline)):
                raise self._completions.timeout_error()


def as_completed(
    futures: Iterable[PrefectFuture[T, M]], timeout: Optional[float] = None
) -> _AsCompleted[T, M]:
    """Yield the futures as their runs finish, from any runner.

    Iterate with ``for`` in synchronous code (it blocks the thread) and with
    ``async for`` in async code (it waits without a thread, on asyncio or trio);
    either works on blocking and asynchronous futures alike. ``for`` inside an event
    loop over asynchronous futures is refused, since blocking there could starve the
    very calls being waited for.

    >>> for future in as_completed(futures, timeout=60):        # doctest: +SKIP
    ...     print(future.result())
    >>> async for future in as_completed(futures, timeout=60):  # doctest: +SKIP
    ...     print(await future.result())

    :param futures: :class:`PrefectFuture` objects; duplicates are yielded once
    :param timeout: the most seconds, counted from this call, until the last one is
        yielded; None for no limit
    :raises TimeoutError: while iterating, when ``timeout`` passes first
    :raises TypeError: if an item is not a PrefectFuture
    """
    return _AsCompleted(futures, timeout)


@overload
def wait(
    futures: Iterable[PrefectFuture[T, Sync]], timeout: Optional[float] = None
) -> DoneAndNotDone[T, Sync]: ...


@overload
def wait(
    futures: Iterable[PrefectFuture[T, Async]], timeout: Optional[float] = None
) -> Coroutine[Any, Any, DoneAndNotDone[T, Async]]: ...


@overload
def wait(
    futures: Iterable[PrefectFuture[Any, Any]], timeout: Optional[float] = None
) -> Union[DoneAndNotDone[Any, Any], Coroutine[Any, Any, DoneAndNotDone[Any, Any]]]: ...


def wait(futures: Iterable[PrefectFuture[Any, Any]], timeout: Optional[float] = None) -> Any:
    """Wait until every future is done, or ``timeout`` seconds pass.

    Works on futures from any runner, like :func:`concurrent.futures.wait`. Like
    :meth:`PrefectFuture.wait`, it blocks for blocking futures (a sync flow's, the
    blocking twins') and returns an awaitable for asynchronous ones (an async flow's,
    the facade's) or, given no futures, when called inside an event loop:

    >>> done, not_done = wait(futures, timeout=10)           # doctest: +SKIP
    >>> done, not_done = await wait(futures, timeout=10)     # in async code  # doctest: +SKIP

    :param futures: :class:`PrefectFuture` objects; duplicates count once
    :param timeout: the most seconds to wait; None to wait until all are done
    :return: ``DoneAndNotDone(done, not_done)``, two sets of futures; a timeout is
        not an error
    :raises TypeError: if an item is not a PrefectFuture
    """
    arrivals = _AsCompleted(futures, timeout)
    if arrivals.futures:
        asynchronous = any(future.asynchronous for future in arrivals.futures)
    else:
        asynchronous = in_event_loop()
    if asynchronous:
        return _wait_async(arrivals)
    try:
        for _ in arrivals:
            pass
    except TimeoutError:  # not an error here: the futures not done say so
        pass
    return arrivals.done_and_not_done()


async def _wait_async(arrivals: _AsCompleted[Any, Any]) -> DoneAndNotDone[Any, Any]:
    try:
        async for _ in arrivals:
            pass
    except TimeoutError:
        pass
    return arrivals.done_and_not_done()
