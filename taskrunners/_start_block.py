"""What an async runner's ``start()`` returns, and what leaves its block.

``async with runner.start():`` works; a plain ``with`` is refused with a TypeError
pointing to ``async with`` and to the blocking twin in :mod:`taskrunners.sync`.
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Optional, TypeVar

__all__ = ["StartBlock", "start_block", "unwrapped_interrupt"]

T = TypeVar("T")


class StartBlock:
    """What ``start()`` returns: an async context manager that refuses a plain ``with``."""

    __slots__ = ("_runner", "_manager")

    def __init__(self, runner: Any, manager: AsyncContextManager[Any]) -> None:
        self._runner = runner
        self._manager = manager

    async def __aenter__(self) -> Any:
        return await self._manager.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> Optional[bool]:
        return await self._manager.__aexit__(*exc_info)

    def __enter__(self) -> None:
        name = type(self._runner).__name__
        raise TypeError(
            f"{name}.start() is an async context manager: use `async with "
            f"runner.start():` in async code, or the blocking twin "
            f"taskrunners.sync.{name} with a plain `with`."
        )

    def __exit__(self, *exc_info: Any) -> None:
        """Never reached: :meth:`__enter__` refuses."""


def start_block(method: Callable[[T], AsyncIterator[T]]) -> Callable[[T], AsyncContextManager[T]]:
    """An async generator method made a ``start()`` that returns a :class:`StartBlock`."""
    manager = asynccontextmanager(method)

    @functools.wraps(method)
    def start(self: T) -> AsyncContextManager[T]:
        return StartBlock(self, manager(self))

    return start


def unwrapped_interrupt(exc: BaseException) -> BaseException:
    """A task group's exception group that holds only Ctrl-Cs: the first of them."""
    inner = getattr(exc, "exceptions", None)
    if inner and all(isinstance(one, KeyboardInterrupt) for one in inner):
        return inner[0]
    return exc
