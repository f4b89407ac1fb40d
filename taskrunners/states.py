"""The states a call ends in, shared by every runner, the blocking core and the facade.

A runner never lets a call's exception escape: whatever ``run_fn`` does comes back
as a :class:`State`. States pickle with cloudpickle, so they cross process and
cluster boundaries unchanged.

>>> from taskrunners.states import Completed, Failed
>>> Completed(data=42).result()
42
>>> Failed(data=ValueError("boom")).result(raise_on_failure=False)
ValueError('boom')
"""

from __future__ import annotations

import enum
import warnings
from typing import Any, Generic, Optional, TypeVar, Union, overload

from typing_extensions import Literal

import anyio

__all__ = [
    "StateType",
    "State",
    "Pending",
    "Running",
    "Completed",
    "Failed",
    "Crashed",
    "Cancelled",
    "exception_to_crashed_state",
]

R = TypeVar("R")


class StateType(str, enum.Enum):
    """The kinds of state a call can be in."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"
    CANCELLED = "CANCELLED"


_DEFAULT_NAMES = {state_type: state_type.value.title() for state_type in StateType}
_FINAL_TYPES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
)


class State(Generic[R]):
    """The state of a call: its type, a name, a message and its data.

    :param type: the :class:`StateType`
    :param name: a readable name; defaults to the title-cased type (``"Completed"``)
    :param message: why the call is in this state, for people
    :param data: the call's return value, or the exception of a failed or crashed call

    >>> State(StateType.COMPLETED, data=1)
    Completed(data=1)
    """

    __slots__ = ("type", "name", "message", "data")

    def __init__(
        self,
        type: StateType,
        name: Optional[str] = None,
        message: Optional[str] = None,
        data: Any = None,
    ) -> None:
        self.type = type if type.__class__ is StateType else StateType(type)
        self.name = name if name is not None else _DEFAULT_NAMES[self.type]
        self.message = message
        self.data = data

    def is_pending(self) -> bool:
        return self.type is StateType.PENDING

    def is_running(self) -> bool:
        return self.type is StateType.RUNNING

    def is_completed(self) -> bool:
        return self.type is StateType.COMPLETED

    def is_failed(self) -> bool:
        return self.type is StateType.FAILED

    def is_crashed(self) -> bool:
        return self.type is StateType.CRASHED

    def is_cancelled(self) -> bool:
        return self.type is StateType.CANCELLED

    def is_final(self) -> bool:
        return self.type in _FINAL_TYPES

    @overload
    def result(self, raise_on_failure: Literal[True] = True) -> R: ...

    @overload
    def result(self, raise_on_failure: bool) -> Union[R, BaseException]: ...

    def result(self, raise_on_failure: bool = True) -> Any:
        """Return the data of this state.

        :param raise_on_failure: for a failed or crashed state holding an
            ``Exception``, raise it instead of returning it
        :return: the data; a ``BaseException`` that is not an ``Exception``
            (KeyboardInterrupt, SystemExit) is returned, never raised, with a warning
            when ``raise_on_failure`` is true
        """
        data = self.data
        if raise_on_failure and isinstance(data, BaseException) and (
            self.is_failed() or self.is_crashed() or self.is_cancelled()
        ):
            if isinstance(data, Exception):
                raise data
            warnings.warn(
                f"The state {self.name!r} holds {type(data).__name__}, which is not "
                "re-raised; it is returned instead.",
                RuntimeWarning,
                stacklevel=2,
            )
        return data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, State):
            return NotImplemented
        return (
            self.type is other.type
            and self.name == other.name
            and self.message == other.message
            and _same_data(self.data, other.data)
        )

    def __hash__(self) -> int:
        # Data may be unhashable (a list, an array): equal States share the rest.
        return hash((self.type, self.name, self.message))

    def __getstate__(self) -> tuple:
        return (self.type, self.name, self.message, self.data)

    def __setstate__(self, state: tuple) -> None:
        self.type, self.name, self.message, self.data = state

    def __repr__(self) -> str:
        parts = []
        if self.message is not None:
            parts.append(f"message={self.message!r}")
        if self.data is not None:
            parts.append(f"data={self.data!r}")
        label = self.name if self.name == self.type.value.title() else (
            f"{self.type.value.title()}[{self.name}]"
        )
        return f"{label}({', '.join(parts)})"


def _same_data(a: Any, b: Any) -> bool:
    """Whether two States' data are equal: ``==``, or identity when that cannot tell.

    Exceptions have no value equality of their own; they count as equal when type and
    arguments are, so a Failed state equals its round trip through a pickle.
    """
    if a is b:
        return True
    if isinstance(a, BaseException) and isinstance(b, BaseException):
        return type(a) is type(b) and a.args == b.args
    try:
        equal = a == b
        # An array compares element-wise; its truth value raises: fall back to identity.
        return equal if type(equal) is bool else bool(equal)
    except Exception:
        return False


def Pending(**kwargs: Any) -> State:
    """A state for a call that has not started."""
    return State(StateType.PENDING, **kwargs)


def Running(**kwargs: Any) -> State:
    """A state for a call that is running."""
    return State(StateType.RUNNING, **kwargs)


def Completed(**kwargs: Any) -> State:
    """A state for a call that returned; ``data`` is its value."""
    return State(StateType.COMPLETED, **kwargs)


def Failed(**kwargs: Any) -> State:
    """A state for a call whose body raised; ``data`` is the exception."""
    return State(StateType.FAILED, **kwargs)


def Crashed(**kwargs: Any) -> State:
    """A state for a call its environment stopped (an interrupt, a dead worker, ...)."""
    return State(StateType.CRASHED, **kwargs)


def Cancelled(**kwargs: Any) -> State:
    """A state for a call cancelled before it could finish."""
    return State(StateType.CANCELLED, **kwargs)


def _is_cancellation(exc: BaseException) -> bool:
    import asyncio
    import concurrent.futures

    if isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        return True
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except Exception:  # no event loop running in this thread
        return type(exc).__name__ == "Cancelled"


def exception_to_crashed_state(exc: BaseException) -> State:
    """Turn an exception that stopped a call into a ``Crashed`` state.

    >>> exception_to_crashed_state(KeyboardInterrupt()).message
    'Execution was aborted by an interrupt signal.'
    """
    if _is_cancellation(exc):
        message = "Execution was cancelled by the runtime environment."
    elif isinstance(exc, KeyboardInterrupt):
        message = "Execution was aborted by an interrupt signal."
    elif isinstance(exc, SystemExit):
        message = "Execution was aborted by Python system exit call."
    else:
        message = "Execution was interrupted by an unexpected exception."
    return Crashed(message=message, data=exc)
