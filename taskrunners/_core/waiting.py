"""Waiting for calls from async code, on asyncio or trio, without holding a thread.

The futures and the facade both wait this way; a thread blocks on a call with
:func:`~taskrunners._core.calls.wait_for_state` instead.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Optional

import anyio
import sniffio

from taskrunners._core.calls import Completes

__all__ = ["wait_until_done", "in_event_loop"]


def in_event_loop() -> bool:
    """Whether this thread is running an asyncio or trio event loop."""
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


def _loop_waker() -> Callable[[Callable[[], Any]], None]:
    """A function that runs a callable on the current event loop from any thread."""
    loop_thread = threading.get_ident()
    schedule: Callable[[Callable[[], Any]], Any]
    if sniffio.current_async_library() == "trio":
        import trio

        schedule = trio.lowlevel.current_trio_token().run_sync_soon
    else:
        schedule = asyncio.get_running_loop().call_soon_threadsafe

    def wake(fn: Callable[[], Any]) -> None:
        if threading.get_ident() == loop_thread:
            fn()
            return
        try:
            schedule(fn)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    return wake


async def wait_until_done(call: Completes, timeout: Optional[float]) -> bool:
    """Wait until ``call`` is done; False if ``timeout`` passed first."""
    if call.done():
        return True
    event = anyio.Event()
    wake = _loop_waker()
    call.add_done_callback(lambda _: wake(event.set))
    with anyio.move_on_after(timeout):
        await event.wait()
    return call.done()
