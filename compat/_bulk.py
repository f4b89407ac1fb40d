"""``RunnerExecutor.map`` and ``amap``: many items as a few runner calls, no future per item.

The path an item travels: ``map`` zips the iterables (the items of one iterable stay
bare, no tuple each); a :class:`MapRun` cuts the items into chunks (an int ``chunksize``, or sized from how long items took, as
``batch_size="auto"`` sizes batches) and submits each chunk as one call of a
:class:`_Chunk`; the worker runs the chunk's items in order and returns their
values, stopping at the first exception; the consumer waits for each chunk in turn,
yields its values and raises an item's exception when its turn comes.

Without ``buffersize`` every item is read at the ``map`` call (as the standard
library does) and chunks go out as earlier ones finish, a few per worker at a time,
so that a chunk can be sized from the ones before it and ``shutdown(cancel_futures=
True)`` still finds the rest unsent. With ``buffersize`` the consumer reads items as
it goes: at most ``buffersize`` chunks (an int ``chunksize``) or items (``None``)
are submitted ahead of it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import threading
import time
from typing import Any, AsyncIterator, Callable, Deque, Iterable, Iterator, List, Optional, Tuple

import anyio

from taskrunners._core import seam
from taskrunners._core.seam import Memo, TaskRun, all_unchanging, is_coroutine_function, snapshot_each
from taskrunners.states import Completed, State

__all__ = ["MapRun", "check_sizes", "results", "aresults"]

#: A chunk of ``chunksize=None`` aims at about this much work, as an "auto" batch does.
TARGET_SECONDS = 0.1
#: The most items in one chunk of ``chunksize=None``, however short they are.
MAX_ITEMS = 4096


def check_sizes(chunksize: Any, buffersize: Any) -> None:
    """:raises TypeError, ValueError: as the standard library's ``map`` does"""
    if buffersize is not None:
        if not isinstance(buffersize, int):
            raise TypeError(f"buffersize must be an integer or None, got {buffersize!r}")
        if buffersize < 1:
            raise ValueError(f"buffersize must be None or > 0, got {buffersize!r}")
    if chunksize is not None:
        if not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an integer or None, got {chunksize!r}")
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")


class _Chunk:
    """Runs ``fn(*args)`` for each item in order (``fn(item)`` for the items of one
    iterable, kept bare); its State holds ``(values, error, seconds)``: the values
    before the first exception, that exception (or None), and the time the items took
    in the worker."""

    __slots__ = ("fn", "items", "spread", "key")

    def __init__(self, fn: Callable[..., Any], items: List[Any], spread: bool, key: Any) -> None:
        self.fn, self.items, self.spread, self.key = fn, items, spread, key

    def __getstate__(self) -> tuple:
        return (self.fn, self.items, self.spread)

    def __setstate__(self, state: tuple) -> None:
        self.fn, self.items, self.spread = state
        self.key = None

    def __snapshot__(self, memo: Optional[Memo]) -> "_Chunk":
        # For runners that send calls later: the arguments as they are at submit.
        if not self.spread:
            if all_unchanging(self.items):
                return self
            return type(self)(self.fn, snapshot_each(self.items, memo), False, self.key)
        if all(all_unchanging(args) for args in self.items):
            return self
        items = [tuple(snapshot_each(args, memo)) for args in self.items]
        return type(self)(self.fn, items, True, self.key)

    def __batch_key__(self, run_kwargs: Any) -> Any:
        return self.key  # the map: its chunks are timed apart from other calls of fn

    def __call__(self) -> State:
        values: List[Any] = []
        append, fn = values.append, self.fn
        start = time.perf_counter()
        try:
            if self.spread:
                for args in self.items:
                    append(fn(*args))
            else:
                for item in self.items:
                    append(fn(item))
        except Exception as exc:
            return Completed(data=(values, exc, time.perf_counter() - start))
        return Completed(data=(values, None, time.perf_counter() - start))


class _AsyncChunk(_Chunk):
    __slots__ = ()

    async def __call__(self) -> State:  # type: ignore[override]
        values: List[Any] = []
        start = time.perf_counter()
        try:
            for args in self.items if self.spread else ((item,) for item in self.items):
                values.append(await self.fn(*args))
        except Exception as exc:
            return Completed(data=(values, exc, time.perf_counter() - start))
        return Completed(data=(values, None, time.perf_counter() - start))


class _Sizes:
    """How many items the next chunk holds: fixed, or learned from measured times."""

    __slots__ = ("fixed", "cap", "_mean", "_last")

    def __init__(self, fixed: Optional[int], cap: int) -> None:
        self.fixed, self.cap = fixed, cap
        self._mean: Optional[float] = None
        self._last = 1

    def record(self, seconds: float, items: int) -> None:
        if items:
            per_item = seconds / items
            mean = self._mean
            self._mean = per_item if mean is None else mean + 0.5 * (per_item - mean)

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        mean = self._mean
        if mean is None:
            return 1  # the first items go alone, to be measured
        wanted = self.cap if mean <= 0 else max(1, int(TARGET_SECONDS / mean))
        # Twice the last at most: an estimate from a few fast items may not last.
        self._last = max(1, min(self.cap, wanted, 2 * self._last))
        return self._last


# What MapRun.pop returns while the chunk the consumer wants is not submitted yet.
NOT_YET: Any = object()


class MapRun:
    """The chunks of one ``map`` call: cutting, submitting, handing them out in order.

    :param buffersize: None: every item read now, chunks fed as earlier ones finish;
        else the consumer submits as it goes, that many chunks (or items) ahead
    """

    def __init__(
        self,
        core: Any,
        fn: Callable[..., Any],
        iterables: Tuple[Iterable[Any], ...],
        chunksize: Optional[int],
        buffersize: Optional[int],
        refuse: Callable[[], Optional[str]],
        call_timeout: Optional[float] = None,
    ) -> None:
        self._core = core
        self._call_timeout = call_timeout
        self._fn = fn
        self._chunk_type = _AsyncChunk if is_coroutine_function(fn) else _Chunk
        self._name = getattr(fn, "__name__", type(fn).__name__)
        self._buffersize = buffersize
        # Counted in chunks with an int chunksize (as the standard library), else items.
        self._count_items = chunksize is None
        cap = MAX_ITEMS if buffersize is None or chunksize is not None else max(1, buffersize // 4)
        # A time limit is per item: each item is then a call of its own.
        self._sizes = _Sizes(1, 1) if call_timeout is not None else _Sizes(chunksize, min(cap, MAX_ITEMS))
        self._refuse = refuse
        self._lock = threading.Condition(threading.Lock())
        self._chunks: Deque[Tuple[Any, int]] = collections.deque()
        self._ahead = 0  # buffer mode: chunks (or items) submitted, not yet popped
        self._out = 0  # feed mode: chunks submitted and not done
        workers = getattr(core, "max_workers", None) or os.cpu_count() or 1
        self._limit = max(4, 2 * workers)
        self._feeding = False
        self._exhausted = False
        self._closed = False
        self._error: Optional[BaseException] = None
        #: Set once no chunk will be submitted by a callback any more.
        self.fed = threading.Event()
        # The items of one iterable are kept bare: no tuple each.
        self._spread = len(iterables) != 1
        items: Iterator[Any] = zip(*iterables) if self._spread else iter(iterables[0])
        if buffersize is None:
            self._items: Iterator[Any] = iter(list(items))
            self._feed()
        else:
            self.fed.set()
            self._items = items
            self._refill(buffersize)

    # -- submitting --------------------------------------------------------------------

    def _take(self, limit: int = 0) -> Optional[List[Any]]:
        size = self._sizes.next()
        if limit and self._count_items:
            size = min(size, max(1, limit - self._ahead))
        items = list(itertools.islice(self._items, size))
        if not items:
            self._exhausted = True
            return None
        return items

    def _submit(self, items: List[Any]) -> None:
        run_fn: Callable[..., Any] = self._chunk_type(self._fn, items, self._spread, self)
        if self._call_timeout is not None:
            run_fn = seam.with_limit(run_fn, self._call_timeout, shared=False)
        call = seam.call_of(seam.submit(self._core, TaskRun(name=self._name), run_fn, {}))
        with self._lock:
            self._chunks.append((call, len(items)))
            self._lock.notify_all()
        call.add_done_callback(self._chunk_done)

    def _feed(self) -> None:
        # One thread feeds at a time; a call that finishes meanwhile leaves room that
        # the feeding thread sees on its next turn (room is checked under the lock).
        with self._lock:
            if self._feeding:
                return
            self._feeding = True
        while True:
            with self._lock:
                items = None
                if not self._closed and not self._exhausted and self._out < self._limit:
                    items = self._take()
                if items is None:
                    self._feeding = False
                    if self._closed or self._exhausted:
                        self.fed.set()
                        self._lock.notify_all()
                    return
                self._out += 1
            try:
                self._submit(items)
            except BaseException as exc:
                with self._lock:
                    self._error, self._closed, self._feeding = exc, True, False
                    self.fed.set()
                    self._lock.notify_all()
                if not isinstance(exc, Exception):
                    raise  # a Ctrl-C in a Sequential call: the map call stops
                return

    def _refill(self, limit: int) -> None:
        # Buffer mode, in the consumer's thread: submit until ``limit`` are ahead.
        while not self._closed and not self._exhausted and self._ahead < limit:
            if self._count_items and len(self._chunks) >= self._limit:
                return  # a few chunks at a time, so that each is sized from the last
            reason = self._refuse()
            if reason is not None:
                raise RuntimeError(reason)
            items = self._take(limit)
            if items is None:
                return
            self._ahead += len(items) if self._count_items else 1
            self._submit(items)

    def _chunk_done(self, call: Any) -> None:
        state = seam.state_of_done(call)
        if state.is_completed():
            self._sizes.record(state.data[2], len(state.data[0]) + (state.data[1] is not None))
        if self._buffersize is None:
            with self._lock:
                self._out -= 1
            self._feed()

    # -- handing out ----------------------------------------------------------------------

    def pop(self, wait: Optional[float]) -> Any:
        """The next chunk's call and its item count; None once every item was handed out;
        :data:`NOT_YET` if the chunk is not submitted within ``wait`` seconds.

        :raises concurrent.futures.CancelledError: if the rest was cancelled
        :raises RuntimeError: with a buffer, if the executor was shut down
        """
        buffered = self._buffersize is not None
        if buffered:
            # As the standard library: one more goes out before the consumer takes one.
            self._refill(self._buffersize + 1)  # type: ignore[operator]
        with self._lock:
            while not self._chunks:
                if self._error is not None:
                    raise self._error
                if self._exhausted:
                    return None
                if self._closed:
                    raise concurrent.futures.CancelledError()
                if buffered or wait is not None and wait <= 0 or not self._lock.wait(wait):
                    return NOT_YET
            call, count = self._chunks.popleft()
            if buffered:
                self._ahead -= count if self._count_items else 1
        return call, count

    def close(self) -> None:
        """No more chunks; cancel those submitted that have not started."""
        with self._lock:
            self._closed = True
            self.fed.set()
            self._lock.notify_all()
            chunks = list(self._chunks)
        for call, _ in chunks:
            call.cancel()


def _outcome(call: Any) -> Tuple[List[Any], Optional[BaseException]]:
    if call.cancelled():
        return [], concurrent.futures.CancelledError()
    state = seam.state_of_done(call)
    if state.is_completed():
        values, error, _ = state.data
        return values, error
    exc = state.data
    if not isinstance(exc, BaseException):
        exc = RuntimeError(state.message or f"The call ended in state {state.name!r}.")
    return [], exc


def _left(end_time: Optional[float]) -> Optional[float]:
    return None if end_time is None else end_time - time.monotonic()


def results(run: MapRun, end_time: Optional[float]) -> Iterator[Any]:
    """The values of ``run``'s items, in order, for a thread that blocks."""
    try:
        while True:
            entry = run.pop(_left(end_time))
            if entry is None:
                return
            if entry is NOT_YET:
                raise concurrent.futures.TimeoutError()
            call = entry[0]
            del entry
            if not call.done():
                call.expedite()
                try:
                    call.result(_left(end_time))
                except (TimeoutError, concurrent.futures.TimeoutError):
                    if not call.done():
                        raise concurrent.futures.TimeoutError() from None
            values, error = _outcome(call)
            del call
            yield from values
            if error is not None:
                raise error
    finally:
        run.close()


async def aresults(run: MapRun, end_time: Optional[float]) -> AsyncIterator[Any]:
    """The values of ``run``'s items, in order, for async code: waits holding no thread."""
    try:
        while True:
            entry = run.pop(0)
            while entry is NOT_YET:
                left = _left(end_time)
                if left is not None and left <= 0:
                    raise concurrent.futures.TimeoutError()
                await anyio.sleep(0.001)  # a callback is about to submit it
                entry = run.pop(0)
            if entry is None:
                return
            call = entry[0]
            del entry
            if not call.done():
                call.expedite()
                if not await seam.wait_until_done(call, _left(end_time)):
                    raise concurrent.futures.TimeoutError()
            values, error = _outcome(call)
            del call
            for value in values:
                yield value
            if error is not None:
                raise error
    finally:
        run.close()
