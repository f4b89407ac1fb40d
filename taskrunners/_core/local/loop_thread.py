"""An asyncio event loop in a thread of its own, for coroutine calls of the blocking twins."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Dict

import sniffio

from taskrunners._core.calls import Call
from taskrunners._core.limits import split_limit
from taskrunners._core.running import arun_limited, arun_to_state


class LoopThread:
    """Runs coroutine calls on one event loop, in a daemon thread it owns.

    Thousands of coroutine calls interleave there without a thread each, and the
    caller's thread may itself be running a loop (a notebook) without conflict.

    Not anyio's ``start_blocking_portal()``, which does the same: its
    ``start_task_soon`` waits for the loop thread to take each task, a round trip per
    call. Both copy the submitting thread's context variables.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def submit(self, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], name: str = "call") -> Call:
        """Schedule a coroutine call; its State arrives on the returned call.

        The task runs in a copy of the submitting thread's context variables. The call
        can be cancelled until its task starts; :meth:`stop` cancels running ones. A
        call with a time limit is cancelled once it passes (TimedOut, naming ``name``).
        """
        call = Call()
        # The handle copies this thread's context, and the task copies the handle's.
        self.loop.call_soon_threadsafe(self._start, call, run_fn, run_kwargs, name)
        return call

    def _start(self, call: Call, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], name: str) -> None:
        if call.set_running():
            self.loop.create_task(self._run(call, run_fn, run_kwargs, name))

    @staticmethod
    async def _run(call: Call, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], name: str) -> None:
        # The copied context may say that the caller runs trio; this loop is asyncio.
        sniffio.current_async_library_cvar.set(None)
        run_fn, seconds = split_limit(run_fn)
        if seconds is None:
            call.set_result(await arun_to_state(run_fn, run_kwargs))
        else:
            call.set_result(await arun_limited(run_fn, run_kwargs, seconds, name))

    def stop(self, cancel: bool, timeout: float = 10.0) -> None:
        """Stop the loop; with ``cancel``, running coroutine calls are cancelled first."""
        if cancel:
            self.loop.call_soon_threadsafe(self._cancel_all)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _cancel_all(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
