"""A runner's settings, documented once for the blocking twin and its async facade.

A twin declares each constructor argument it keeps as a :class:`Setting` with a
one-line docstring; the facade exposes the same attribute, read-only, with
:meth:`Setting.forwarded`, so ``help()`` shows one text on both.
"""

from __future__ import annotations

from typing import Any, Generic, NoReturn, TypeVar, overload

__all__ = ["Setting", "Forwarded", "BATCH_SIZE_DOC", "LARGE_VALUE_BYTES_DOC"]

V = TypeVar("V")
D = TypeVar("D", bound="_Documented[Any]")


class _Documented(Generic[V]):
    """A documented attribute: the descriptor itself on the class, a value on an instance."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    @overload
    def __get__(self: D, instance: None, owner: Any = None) -> D: ...

    @overload
    def __get__(self, instance: object, owner: Any = None) -> V: ...

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return self if instance is None else self._read(instance)

    def _read(self, instance: Any) -> V:
        raise NotImplementedError


class Setting(_Documented[V]):
    """An attribute of a blocking runner that its constructor sets, with a docstring.

    The value lives in the instance's ``__dict__`` under the setting's own name, so
    the runner reads, writes and pickles it as a plain attribute.
    """

    def __init__(self, doc: str) -> None:
        super().__init__("", doc)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def _read(self, runner: Any) -> V:
        try:
            return runner.__dict__[self.name]
        except KeyError:
            raise AttributeError(
                f"{type(runner).__name__!r} object has no attribute {self.name!r}"
            ) from None

    def __set__(self, runner: object, value: V) -> None:
        runner.__dict__[self.name] = value

    def forwarded(self) -> Forwarded[V]:
        """This setting on a facade: read-only, read from the blocking twin in its ``_core``."""
        return Forwarded(self.name, self.__doc__ or "")


class Forwarded(_Documented[V]):
    """A facade's read-only attribute: its twin's :class:`Setting` of the same name."""

    def __set_name__(self, owner: type, name: str) -> None:
        if name != self.name:
            raise TypeError(f"the setting {self.name!r} is forwarded under another name, {name!r}")

    def _read(self, facade: Any) -> V:
        return getattr(facade._core, self.name)

    def __set__(self, facade: object, value: NoReturn) -> None:
        # ``NoReturn``: type checkers report any assignment, as to a read-only property.
        raise AttributeError(
            f"property {self.name!r} of {type(facade).__name__!r} object has no setter"
        )


#: The docstring of the ``batch_size`` setting of the runners that batch calls.
BATCH_SIZE_DOC = 'Calls per engine task: ``"auto"`` (learned per task), or a fixed number.'
LARGE_VALUE_BYTES_DOC = (
    "Arguments pickling to this many bytes or more go to each worker once; None: with every call."
)
