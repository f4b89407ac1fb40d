"""Task runs and the futures a runner hands back for them."""

from __future__ import annotations

import itertools
import os
import random
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Awaitable, Generic, Optional, TypeVar, Union, overload

from taskrunners.states import State

if TYPE_CHECKING:
    from taskrunners._core.calls import CallHandle

__all__ = ["TaskRun", "PrefectFuture", "Sync", "Async"]


class Sync:
    """In type hints, marks a blocking future: ``PrefectFuture[Sync]`` (the twins')."""


class Async:
    """In type hints, marks an awaited future: ``PrefectFuture[Async]`` (the facade's)."""


#: Whether a future blocks (:class:`Sync`) or is awaited (:class:`Async`).
M = TypeVar("M", Sync, Async)

_run_numbers = itertools.count(1)

# uuid4() reads os.urandom on every call, which costs more than a whole thread-pool
# call on some machines. Random 122-bit ids from a generator seeded from os.urandom
# (and reseeded in forked children) are as unique, for a fraction of the cost.
_ids = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)


def _new_run_id() -> uuid.UUID:
    return uuid.UUID(int=_ids.getrandbits(128), version=4)


class TaskRun:
    """One call to be run: a name for people and a unique id for runners.

    :param name: a readable name; defaults to ``"task-run-<n>"``
    :param id: a :class:`uuid.UUID`; defaults to a fresh random (version 4) one

    >>> run = TaskRun(name="load")
    >>> run.name, type(run.id).__name__
    ('load', 'UUID')
    """

    __slots__ = ("name", "id")

    def __init__(self, name: Optional[str] = None, id: Optional[uuid.UUID] = None) -> None:
        self.id = id if id is not None else _new_run_id()
        self.name = name if name is not None else f"task-run-{next(_run_numbers)}"

    def __getstate__(self) -> tuple:
        return (self.name, self.id)

    def __setstate__(self, state: tuple) -> None:
        self.name, self.id = state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskRun):
            return NotImplemented
        return self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"TaskRun(name={self.name!r}, id={self.id!r})"


class PrefectFuture(Generic[M]):
    """The handle to one submitted call.

    With ``asynchronous=True`` (the facade's default), :meth:`wait` and
    :meth:`result` return awaitables; with ``False`` (the blocking twins), they block.
    Type checkers tell the two apart as ``PrefectFuture[Async]`` and
    ``PrefectFuture[Sync]``.

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

    @overload
    def wait(self: "PrefectFuture[Sync]", timeout: Optional[float] = None) -> Optional[State]: ...

    @overload
    def wait(
        self: "PrefectFuture[Async]", timeout: Optional[float] = None
    ) -> Awaitable[Optional[State]]: ...

    def wait(
        self, timeout: Optional[float] = None
    ) -> Union[Optional[State], Awaitable[Optional[State]]]:
        """The final State of the call, or None when ``timeout`` seconds pass first.

        A later call may still succeed. Awaitable when the future is asynchronous.
        """
        if self.asynchronous:
            return self.task_runner.wait(self, timeout)
        from taskrunners._core.seam import wait_blocking

        return wait_blocking(self, timeout)

    @overload
    def result(
        self: "PrefectFuture[Sync]", timeout: Optional[float] = None, raise_on_failure: bool = True
    ) -> Any: ...

    @overload
    def result(
        self: "PrefectFuture[Async]", timeout: Optional[float] = None, raise_on_failure: bool = True
    ) -> Awaitable[Any]: ...

    def result(self, timeout: Optional[float] = None, raise_on_failure: bool = True) -> Any:
        """The data of the call's final State (see :meth:`State.result`).

        Awaitable when the future is asynchronous.

        :raises TimeoutError: when ``timeout`` seconds pass first
        """
        if self.asynchronous:
            return self._result_async(timeout, raise_on_failure)
        from taskrunners._core.seam import wait_blocking

        return _state_data(self, wait_blocking(self, timeout), timeout, raise_on_failure)

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


def _state_data(
    future: "PrefectFuture[Any]", state: Optional[State], timeout: Optional[float], raise_on_failure: bool
) -> Any:
    if state is None:
        raise TimeoutError(
            f"Call {future.task_run.name!r} did not finish within {timeout} seconds."
        )
    return state.result(raise_on_failure=raise_on_failure)
