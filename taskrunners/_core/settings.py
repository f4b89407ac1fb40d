"""A runner's settings, documented once for the blocking twin and its async facade.

A twin declares each constructor argument it keeps as a :class:`Setting` with a
one-line docstring; the facade exposes the same attribute, read-only, with
:meth:`Setting.forwarded`, so ``help()`` shows one text on both.
"""

from __future__ import annotations

from typing import Any, Generic, NoReturn, TypeVar, overload

__all__ = ["Setting", "Forwarded", "BATCH_SIZE_DOC"]

V = TypeVar("V")


class Setting(Generic[V]):
    """An attribute of a blocking runner that its constructor sets, with a docstring.

    The value lives in the instance's ``__dict__`` under the setting's own name, so
    the runner reads, writes and pickles it as a plain attribute.
    """

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, runner: None, owner: Any = None) -> Setting[V]: ...

    @overload
    def __get__(self, runner: object, owner: Any = None) -> V: ...

    def __get__(self, runner: Any, owner: Any = None) -> Any:
        if runner is None:
            return self
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
        return Forwarded(self)


class Forwarded(Generic[V]):
    """A facade's read-only attribute: its twin's :class:`Setting` of the same name."""

    def __init__(self, setting: Setting[V]) -> None:
        self.__doc__ = setting.__doc__
        self.name = setting.name

    def __set_name__(self, owner: type, name: str) -> None:
        if name != self.name:
            raise TypeError(f"the setting {self.name!r} is forwarded under another name, {name!r}")

    @overload
    def __get__(self, facade: None, owner: Any = None) -> Forwarded[V]: ...

    @overload
    def __get__(self, facade: object, owner: Any = None) -> V: ...

    def __get__(self, facade: Any, owner: Any = None) -> Any:
        if facade is None:
            return self
        return getattr(facade._core, self.name)

    def __set__(self, facade: object, value: NoReturn) -> None:
        # ``NoReturn``: type checkers report any assignment, as to a read-only property.
        raise AttributeError(
            f"property {self.name!r} of {type(facade).__name__!r} object has no setter"
        )


#: The docstring of the ``batch_size`` setting of the runners that batch calls.
BATCH_SIZE_DOC = 'Calls per engine task: ``"auto"`` (learned per task), or a fixed number.'
