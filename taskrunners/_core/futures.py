"""Task runs and the futures a runner hands back for them.

A :class:`PrefectFuture` holds the handle of the call it stands for and waits on it
itself. In type hints it carries the type of its call's result and its mode:
``PrefectFuture[int, Sync]`` (the blocking twins', a sync flow's) or
``PrefectFuture[int, Async]`` (the facade's, an async flow's); the mode may be left
out (``PrefectFuture[int]``) when it is not known. The public module
:mod:`taskrunners.futures` re-exports these, beside ``wait`` and ``as_completed``.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid
import warnings
from typing import (
    Any,
    Awaitable,
    Callable,
    Coroutine,
    Generic,
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from typing_extensions import TypeVar as DefaultTypeVar

from taskrunners._core.calls import CallHandle, state_of_done, wait_for_state
from taskrunners._core.waiting import wait_until_done
from taskrunners.states import State

__all__ = [
    "TaskRun",
    "PrefectFuture",
    "Sync",
    "Async",
    "RunFn",
    "numbered_runs",
    "call_of",
    "not_a_runner",
    "wait_for_state_async",
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

# Ids are random 122-bit numbers from a generator seeded from os.urandom (and
# reseeded in forked children), not uuid4(), which reads os.urandom on every call.
_ids = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)


# The variant and version bits of a random (version 4) UUID, as uuid.UUID sets them.
_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_SET = (0x8000 << 48) | (4 << 76)


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
        # The id is kept as its integer; the UUID is made (the same one, in any
        # thread) when somebody reads it.
        self._id: Optional[uuid.UUID] = None
        if id is None:  # a random version-4 UUID, as its integer
            self._number = (_ids.getrandbits(128) & _CLEAR) | _SET
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
        if isinstance(number, uuid.UUID):
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


# The fields TaskRun keeps, reached past the properties of a mapped run.
_NAME_FIELD: Any = TaskRun.__dict__["name"]
_NUMBER_FIELD: Any = TaskRun.__dict__["_number"]


class _Numbering:
    """What the runs of one part of a map share: their task's name, the number of the
    first one, and a random number their ids are made from."""

    __slots__ = ("base", "first", "number")

    def __init__(self, base: str, first: int) -> None:
        self.base = base
        self.first = first
        self.number = (_ids.getrandbits(128) & _CLEAR) | _SET


class _MappedRun(TaskRun):
    """A :class:`TaskRun` of a map that makes its name (``"<task>-<n>"``) and its id
    when they are read, from what the runs of its map share and its index there: it
    keeps two small fields instead of a string and a large number.

    It reads, compares, hashes and pickles as the TaskRun it stands for (it unpickles
    as a plain TaskRun); a name or id set on it is kept as on any TaskRun.
    """

    __slots__ = ("_numbering", "_index")

    def __init__(self, numbering: _Numbering, index: int) -> None:
        self._numbering = numbering
        self._index = index
        self._id = None
        _NAME_FIELD.__set__(self, None)
        _NUMBER_FIELD.__set__(self, None)

    @property
    def name(self) -> str:
        name = _NAME_FIELD.__get__(self)
        if name is None:
            numbering = self._numbering
            return f"{numbering.base}-{numbering.first + self._index}"
        return name

    @name.setter
    def name(self, value: str) -> None:
        _NAME_FIELD.__set__(self, value)

    @property
    def _number(self) -> int:
        number = _NUMBER_FIELD.__get__(self)
        if number is None:  # a random id's bits, the index in its low bits: unique in the map
            return self._numbering.number ^ self._index
        return number

    @_number.setter
    def _number(self, value: int) -> None:
        _NUMBER_FIELD.__set__(self, value)

    def __reduce__(self) -> Tuple[Any, ...]:
        id = self._id
        return (TaskRun, (self.name, id if id is not None else uuid.UUID(int=self._number)))


def numbered_runs(base: str, first: int, count: int) -> List[TaskRun]:
    """``count`` new task runs named ``"<base>-<first>"``, ``"<base>-<first + 1>"``, …,
    each with an id of its own (see :class:`TaskRun`); cheaper to make and to keep
    than as many ``TaskRun(name=...)``."""
    runs: List[TaskRun] = []
    # Indexes up to 256 are ints Python keeps once: a run's index costs nothing.
    for start in range(0, count, 256):
        numbering = _Numbering(base, first + start)
        runs += [_MappedRun(numbering, index) for index in range(min(256, count - start))]
    return runs


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
            return self._wait_async(timeout)
        call = self._call
        if call is None:
            call = call_of(self)
        return wait_for_state(call, timeout)

    async def _wait_async(self, timeout: Optional[float]) -> Optional[State[Any]]:
        call = self._call
        if call is None:  # its runner says why it cannot reach the call
            return await self.task_runner.wait(self, timeout)
        return await wait_for_state_async(call, timeout)

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
        state = await self._wait_async(timeout)
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


async def wait_for_state_async(call: CallHandle, timeout: Optional[float]) -> Optional[State[Any]]:
    """The State of ``call`` once it is done, or None after ``timeout``; holds no thread."""
    call.expedite()
    if not await wait_until_done(call, timeout):
        return None
    return state_of_done(call)


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
