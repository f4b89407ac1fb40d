"""A thread pool of daemon threads, for the plain calls of the Concurrent runner."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

from taskrunners._core.calls import Call
from taskrunners.states import State


class ThreadPool:
    """Runs ``fn(*args) -> State`` calls on up to ``max_workers`` threads.

    Like ``concurrent.futures.ThreadPoolExecutor`` (idle threads are reused, a new one
    is started only when none is idle), with two differences that matter here: its
    threads are daemon threads, so a Ctrl-C'd script exits without waiting for calls
    still sleeping in them, and its handles are the light :class:`Call`.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._max_workers = max_workers
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list = []
        # Threads that finished a call and will take the next one: TPE's idle credit.
        self._idle = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., State], *args: Any) -> Call:
        call = Call()
        self._queue.put((call, fn, args))
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after the runner stopped")
            if self._idle:
                self._idle -= 1
                return call
            if len(self._threads) >= self._max_workers:
                return call
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
        thread.start()
        return call

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                self._queue.put(None)  # pass the stop on to the next idle thread
                return
            call, fn, args = item
            if call.set_running():
                call.set_result(fn(*args))
            # An idle thread must not keep the last call's function, arguments or State.
            del item, call, fn, args
            with self._lock:
                if self._shutdown:
                    return
                self._idle += 1

    def shutdown(self, wait: bool, cancel: bool, timeout: Optional[float] = None) -> None:
        """Stop the threads; ``cancel`` cancels queued calls, ``wait`` joins the threads."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join(timeout)
