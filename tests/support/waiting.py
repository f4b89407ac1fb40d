"""Polling until something holds: a condition, or a file a call or the test leaves.

Registered for pickling by value with the payloads (tests/support/pickling.py), so
calls running in worker processes use it too.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Union

import anyio


def holds_within(condition: Callable[[], object], patience: float, interval: float = 0.01) -> bool:
    """Whether ``condition()`` holds within ``patience`` seconds (checked every ``interval``)."""
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


async def async_holds_within(
    condition: Callable[[], object], patience: float, interval: float = 0.01
) -> bool:
    """:func:`holds_within` without blocking the event loop."""
    with anyio.move_on_after(patience):
        while not condition():
            await anyio.sleep(interval)
        return True
    return False


def wait_until(
    condition: Callable[[], object],
    patience: float = 60.0,
    what: str = "the condition did not hold",
    interval: float = 0.01,
) -> None:
    """Return once ``condition()`` holds; TimeoutError saying ``what`` after ``patience`` s."""
    if not holds_within(condition, patience, interval):
        raise TimeoutError(f"{what} within {patience} s")


def wait_for_path(path: Union[str, os.PathLike], patience: float = 60.0) -> None:
    """Return once the file ``path`` exists; TimeoutError after ``patience`` seconds."""
    wait_until(lambda: os.path.exists(path), patience, f"{path} did not appear")
