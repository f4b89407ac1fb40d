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
import itertools
import os
import random
import threading
import time
import uuid
import warnings
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
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

from taskrunners._core.calls import CallHandle, wait_for_state
from taskrunners._core.waiting import in_event_loop, wait_until_done
from taskrunners.states import State

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


class Sync:
    """In type hints, marks a blocking future: ``PrefectFuture[int, Sync]`` (the twins')."""


class Async:
    """In type hints, marks an awaited future: ``PrefectFuture[int, Async]`` (the facade's)."""


#: What a future's call returns: the data of its final State.
R = TypeVar("R", covariant=True)
#: Whether a future blocks (:class:`Sync`) or is awaited (:class:`Async`); Any when
#: left out, as in ``PrefectFuture[int]``.
M = DefaultTypeVar("M", bound=Union[Sync, Async], default=Any)
#: A result type, in functions over futures.
T = TypeVar("T")

#: What a runner's ``submit`` runs: a function returning a ``State[T]``, or an
#: ``async`` one; its future is a ``PrefectFuture[T, ...]``.
RunFn = Callable[..., Union[State[T], Awaitable[State[T]]]]

_run_numbers = itertools.count(1)

# uuid4() reads os.urandom on every call, which costs more than a whole thread-pool
# call on some machines. Random 122-bit ids from a generator seeded from os.urandom
# (and reseeded in forked children) are as unique, for a fraction of the cost.
_ids = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)


# The variant and version bits of a random (version 4) UUID, as uuid.UUID sets them.
_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_SET = (0x8000 << 48) | (4 << 76)


def _new_run_number() -> int:
    """A random version-4 UUID as its integer: the UUID is made when first read."""
    return (_ids.getrandbits(128) & _CLEAR) | _SET


class TaskRun:
    """One call to be run: a name for people and a unique id for runners.

    :param name: a readable name; defaults to ``"task-run-<n>"``
    :param id: a :class:`uuid.UUID`; defaults to a fresh random (version 4) one

    >>> run = TaskRun(name="load")
    >>> run.name, type(run.id).__name__
    ('load', 'UUID')
    """

    __slots__ = ("name", "_number", "_id")

    def __init__(self, name: Optional[str] = None, id: Optional[uuid.UUID] = None) -> None:
        # Building a uuid.UUID costs more than the rest of a submission: the id is
        # kept as its integer, and the UUID made (the same one, in any thread) when
        # somebody reads it.
        self._id: Optional[uuid.UUID] = None
        if id is None:
            self._number = _new_run_number()
        else:
            self.id = id
        self.name = name if name is not None else f"task-run-{next(_run_numbers)}"

    @property
    def id(self) -> uuid.UUID:
        """The run's unique id."""
        id = self._id
        if id is None:
            id = self._id = uuid.UUID(int=self._number)
        return id

    @id.setter
    def id(self, value: uuid.UUID) -> None:
        if not isinstance(value, uuid.UUID):
            raise TypeError(
                f"A task run's id must be a uuid.UUID, got {type(value).__name__} {value!r}; "
                "leave it out for a fresh random one."
            )
        self._number, self._id = value.int, value

    def __getstate__(self) -> tuple:
        return (self.name, self._number)

    def __setstate__(self, state: tuple) -> None:
        self.name, number = state
        if isinstance(number, uuid.UUID):  # pickled before the id was kept as a number
            self.id = number
        else:
            self._number, self._id = number, None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskRun):
            return NotImplemented
        return self._number == other._number

    def __hash__(self) -> int:
        return hash(self._number)  # the id's hash, as UUID hashes its integer

    def __repr__(self) -> str:
        return f"TaskRun(name={self.name!r}, id={self.id!r})"


class PrefectFuture(Generic[R, M]):
    """The handle to one submitted call.

    With ``asynchronous=True`` (the facade's default), :meth:`wait` and
    :meth:`result` return awaitables; with ``False`` (the blocking twins), they block.
    Type checkers see the call's result type and the mode: ``PrefectFuture[int, Sync]``
    gives an ``int`` from ``result()``, ``PrefectFuture[int, Async]`` an awaitable of one.

    :param task_run: the :class:`TaskRun` this future stands for
    :param task_runner: the runner the call was submitted to
    :param asynchronous: whether :meth:`wait` and :meth:`result` are awaited
    """

    __slots__ = ("task_run", "task_runner", "asynchronous", "_call", "__weakref__")

    def __init__(self, task_run: TaskRun, task_runner: Any, asynchronous: bool = True) -> None:
        self.task_run = task_run
        self.task_runner = task_runner
        self.asynchronous = asynchronous
        # The runner's handle on the call, set by the runner that made this future.
        # Holding it here, and not in the runner once it is done, lets a finished
        # call's State go with its last future.
        self._call: Optional[CallHandle] = None

    @property
    def run_id(self) -> uuid.UUID:
        return self.task_run.id

    # With no timeout, waiting ends only with the call: the State is never None.
    @overload
    def wait(self: PrefectFuture[R, Sync], timeout: None = None) -> State[R]: ...

    @overload
    def wait(self: PrefectFuture[R, Sync], timeout: Optional[float]) -> Optional[State[R]]: ...

    @overload
    def wait(
        self: PrefectFuture[R, Async], timeout: None = None
    ) -> Coroutine[Any, Any, State[R]]: ...

    @overload
    def wait(
        self: PrefectFuture[R, Async], timeout: Optional[float]
    ) -> Coroutine[Any, Any, Optional[State[R]]]: ...

    def wait(self, timeout: Optional[float] = None) -> Any:
        """The final State of the call, or None when ``timeout`` seconds pass first.

        A later call may still succeed. Awaitable when the future is asynchronous.
        """
        if self.asynchronous:
            return self.task_runner.wait(self, timeout)
        call = self._call
        if call is None:
            call = call_of(self)
        return wait_for_state(call, timeout)

    @overload
    def result(
        self: PrefectFuture[R, Sync], timeout: Optional[float] = None, raise_on_failure: bool = True
    ) -> R: ...

    @overload
    def result(
        self: PrefectFuture[R, Async],
        timeout: Optional[float] = None,
        raise_on_failure: bool = True,
    ) -> Coroutine[Any, Any, R]: ...

    def result(self, timeout: Optional[float] = None, raise_on_failure: bool = True) -> Any:
        """The data of the call's final State (see :meth:`State.result`).

        Awaitable when the future is asynchronous.

        :raises TimeoutError: when ``timeout`` seconds pass first
        """
        if self.asynchronous:
            return self._result_async(timeout, raise_on_failure)
        call = self._call
        if call is None:
            call = call_of(self)
        return _state_data(self, wait_for_state(call, timeout), timeout, raise_on_failure)

    async def _result_async(self, timeout: Optional[float], raise_on_failure: bool) -> Any:
        state = await self.task_runner.wait(self, timeout)
        return _state_data(self, state, timeout, raise_on_failure)

    def __hash__(self) -> int:
        return hash(self.task_run.id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefectFuture):
            return NotImplemented
        return self.task_run.id == other.task_run.id

    def __bool__(self) -> bool:
        warnings.warn(
            "A 'PrefectFuture' was cast to a boolean, which is always True. "
            "Did you mean to check its result with `future.result()` or "
            "`future.wait()`?",
            stacklevel=2,
        )
        return True

    def __repr__(self) -> str:
        return f"PrefectFuture({self.task_run.name!r})"

    def __getstate__(self) -> tuple:
        return (self.task_run, self.task_runner, self.asynchronous)

    def __setstate__(self, state: tuple) -> None:
        self.task_run, self.task_runner, self.asynchronous = state
        self._call = None


def call_of(future: PrefectFuture[Any], runner: Any = None) -> CallHandle:
    """The handle of the call ``future`` stands for, as ``runner`` (or its own runner) sees it.

    A future holds the handle its runner gave it. One that holds none (unpickled, or
    made by hand) asks its runner, which says why it cannot reach the call. A runner,
    blocking twin or facade, finds a future's call with its ``_call_of`` method.

    :raises TypeError: if ``future`` is not a PrefectFuture, or its runner is no
        taskrunners runner
    :raises RuntimeError: if the runner cannot reach the call
    """
    if not isinstance(future, PrefectFuture):
        raise TypeError(
            f"Expected a PrefectFuture (what submitting a task returns), got "
            f"{type(future).__name__}: {future!r}."
        )
    if runner is not None:
        return runner._call_of(future)
    call = future._call
    if call is not None:
        return call
    runner = future.task_runner
    find = getattr(runner, "_call_of", None)
    if find is None:
        raise not_a_runner(runner)
    return find(future)


def not_a_runner(runner: Any) -> TypeError:
    """The error for an object given where a taskrunners runner was expected."""
    return TypeError(
        f"Expected a taskrunners runner, got {type(runner).__name__}: {runner!r}; pass "
        "e.g. taskrunners.ConcurrentTaskRunner() or taskrunners.sync.ConcurrentTaskRunner()."
    )


def _state_data(
    future: PrefectFuture[Any],
    state: Optional[State[Any]],
    timeout: Optional[float],
    raise_on_failure: bool,
) -> Any:
    if state is None:
        raise TimeoutError(
            f"Call {future.task_run.name!r} did not finish within {timeout} seconds."
        )
    return state.result(raise_on_failure=raise_on_failure)


# -- waiting for several futures, from any runner ---------------------------------------


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
