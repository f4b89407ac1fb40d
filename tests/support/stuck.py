"""Calls that never end by themselves, for the timeout tests; they travel by value.

Each one counts its progress by appending a byte to a file (``counter``), so that a
test in another process can see whether the work goes on after its limit: a busy
loop keeps counting while it runs, a sleeping call counts once before its sleep and
once after, a socket read once before and once if the read ever returns.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Optional

from taskrunners.states import Completed, State


def bump(counter: str) -> None:
    """Add one to ``counter``."""
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)


def count(counter: str) -> int:
    """How many times ``counter`` was bumped."""
    try:
        return os.path.getsize(counter)
    except FileNotFoundError:
        return 0


def pid_file(counter: str) -> str:
    """Where a stuck call writes the pid of its process."""
    return counter + ".pid"


def _started(counter: str) -> None:
    with open(pid_file(counter), "w") as file:
        file.write(str(os.getpid()))
    bump(counter)


def sleeping(counter: str, seconds: float = 30.0) -> State:
    """Sleep ``seconds`` in one blocking call."""
    _started(counter)
    time.sleep(seconds)
    bump(counter)
    return Completed(data="woke up")


def busy(counter: str, seconds: float = 30.0) -> State:
    """Run Python code without a pause for ``seconds``, counting every 0.05 s."""
    _started(counter)
    end = time.monotonic() + seconds
    next_bump = time.monotonic() + 0.05
    while time.monotonic() < end:
        if time.monotonic() >= next_bump:
            bump(counter)
            next_bump += 0.05
    return Completed(data="done")


def reading(counter: str, port: int) -> State:
    """Read from a socket whose peer never writes."""
    _started(counter)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.recv(1)
    bump(counter)
    return Completed(data="read")


async def asleep(counter: str, seconds: float = 30.0) -> State:
    """A coroutine that awaits a sleep of ``seconds`` (on asyncio or trio)."""
    import anyio

    _started(counter)
    await anyio.sleep(seconds)
    bump(counter)
    return Completed(data="woke up")


def quick(value: Any, counter: Optional[str] = None) -> State:
    """Return ``value`` at once (counting the call, if given a counter)."""
    if counter is not None:
        bump(counter)
    return Completed(data=value)


def nap_then(value: Any, seconds: float, counter: Optional[str] = None) -> State:
    """Sleep ``seconds``, then return ``value`` (counting the call, if given a counter)."""
    time.sleep(seconds)
    if counter is not None:
        bump(counter)
    return Completed(data=value)


def busy_if(value: Any, counter: str, stuck: bool) -> State:
    """Count this call, then return ``value``, or, if ``stuck``, loop without end."""
    bump(counter)
    while stuck:
        pass
    return Completed(data=value)
