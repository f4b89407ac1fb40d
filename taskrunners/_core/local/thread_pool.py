"""A thread pool of daemon threads, for the plain calls of the Concurrent runner."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Dict, Optional, Set, Tuple

from taskrunners._core.calls import Call
from taskrunners._core.limits import Limited, ThreadGuard, timed_out_state
from taskrunners._core.running import run_limited
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
        self._made = 0
        # Threads whose call went past its limit: they leave once it returns.
        self._abandoned: Set[int] = set()

    def submit(self, fn: Callable[..., State], *args: Any) -> Call:
        return self._put(Call(), fn, args)

    def submit_limited(
        self, run: Callable[..., State], limited: Limited, run_kwargs: Dict[str, Any], name: str
    ) -> Call:
        """Submit a plain call with a time limit, as ``run(run_limited, ...)``.

        At the limit the call is TimedOut at once and interrupted in its thread; the
        thread is abandoned: it leaves the pool, which starts another if calls wait,
        and exits once its call returns.
        """
        call = Call()
        seconds = limited.seconds

        def expire(guard: ThreadGuard) -> None:
            call.set_result(timed_out_state(name, seconds))
            guard.interrupt()
            self._abandon(guard.ident)

        return self._put(call, run, (run_limited, limited.run_fn, run_kwargs, seconds, name, expire))

    def _put(self, call: Call, fn: Callable[..., State], args: Tuple[Any, ...]) -> Call:
        self._queue.put((call, fn, args))
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after the runner stopped")
            if self._idle:
                self._idle -= 1
                return call
            if len(self._threads) >= self._max_workers:
                return call
            thread = self._new_thread()
        thread.start()
        return call

    def _new_thread(self) -> threading.Thread:
        # With the lock held.
        self._made += 1
        thread = threading.Thread(target=self._work, name=f"{self._name}-{self._made}", daemon=True)
        self._threads.append(thread)
        return thread

    def _abandon(self, ident: int) -> None:
        """The thread ``ident`` runs a call past its limit: it no longer counts."""
        thread = None
        with self._lock:
            for running in self._threads:
                if running.ident == ident:
                    self._threads.remove(running)
                    self._abandoned.add(ident)
                    break
            else:
                return
            # Idle credit is for threads that will take a call: never more than remain.
            self._idle = min(self._idle, len(self._threads))
            # The calls waiting for a thread get this one's place.
            if not self._shutdown and self._queue.qsize() > self._idle:
                thread = self._new_thread()
        if thread is not None:
            thread.start()

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
                if self._abandoned and threading.get_ident() in self._abandoned:
                    self._abandoned.discard(threading.get_ident())
                    return  # its place went to another thread
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
