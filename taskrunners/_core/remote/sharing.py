"""Large values that many calls share: each worker receives one once while calls use it.

At ``submit`` (see :mod:`~taskrunners._core.remote.snapshots`) a value that may change is
pickled with protocol 5, its buffers out of band (a numpy array's data is not copied
into the pickle). If the pickle and its buffers weigh ``large_value_bytes`` or more,
the runner's :class:`SharedValues` keeps one copy of them, the call's snapshot, and
the call's arguments hold a :class:`Shared` in the value's place:

- the same object submitted again is compared byte for byte with the copy kept
  (``memcmp``, about 7 ms for 80 MB here): unchanged, the calls share one
  :class:`Shared`; changed, the new value gets a copy of its own. So every call sees
  its value as it was at its submit;
- the runner places the copy where its workers read it: a file in shared memory
  (Parallel, which maps it), a scattered key (Dask), an object in the store (Ray,
  whose object is the copy: this process reads it in place);
- in a worker the first call that needs it loads it, with read-only buffers
  (zero-copy where the type allows: a numpy array is a read-only view), and keeps
  it by key for the calls that follow (:func:`load`);
- a :class:`Shared` lives while a pending call's arguments hold it: when the last
  call lets go, its copy is released (file removed, key released, object freed),
  and at the end of the block every copy left is.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import mmap
import os
import pickle
import sys
import tempfile
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "DEFAULT_LARGE_VALUE_BYTES",
    "Copy",
    "MappedCopy",
    "Shared",
    "SharedValues",
    "Payload",
    "check_large_value_bytes",
    "collecting",
    "collect",
    "placed",
    "load",
    "load_placed",
]

#: Values whose pickle and buffers weigh this many bytes or more are shared.
DEFAULT_LARGE_VALUE_BYTES = 1 << 20

_ALIGN = 64  # buffer offsets in a copy, so that arrays keep their alignment


def check_large_value_bytes(value: Optional[int]) -> Optional[int]:
    """``value`` if it is None or a positive int, else a TypeError/ValueError naming it."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"`large_value_bytes` must be a positive int (bytes) or None, got {value!r}."
        )
    if value <= 0:
        raise ValueError(
            f"`large_value_bytes` must be a positive number of bytes or None, got {value!r}."
        )
    return value


class Copy:
    """One value's pickle and buffers, as a block keeps them while calls need them."""

    __slots__ = ()

    @property
    def header(self) -> memoryview:
        raise NotImplementedError

    def buffers(self) -> List[memoryview]:
        raise NotImplementedError

    def close(self) -> None:
        """Let the copy go (its memory is freed once no view of it is left)."""


class MappedCopy(Copy):
    """One value's pickle and buffers, copied into one memory map."""

    __slots__ = ("memory", "header_size", "spans", "path")

    def __init__(self, memory: mmap.mmap, header_size: int, spans: List[Tuple[int, int]], path: Optional[str]) -> None:
        self.memory = memory
        self.header_size = header_size
        self.spans = spans
        self.path = path

    @property
    def header(self) -> memoryview:
        return memoryview(self.memory)[: self.header_size]

    def buffers(self) -> List[memoryview]:
        view = memoryview(self.memory)
        return [view[offset : offset + size] for offset, size in self.spans]

    def close(self) -> None:
        try:
            self.memory.close()
        except BufferError:  # a view of it is still out: freed with that view
            pass


class Shared:
    """Stands in a call's arguments for a large value; pickles as its runner places it."""

    __slots__ = ("key", "nbytes", "store", "reference", "__weakref__")

    def __init__(self, key: str, nbytes: int, store: "SharedValues") -> None:
        self.key = key
        self.nbytes = nbytes
        self.store = store
        #: What the engine holds it by (a Dask future, a Ray ObjectRef), if anything.
        self.reference: Any = None

    def __reduce__(self) -> Tuple[Any, ...]:
        return self.store.reduce(self)

    def __sizeof__(self) -> int:  # what it weighs in a task graph: a key
        return object.__sizeof__(self) + len(self.key)

    def __repr__(self) -> str:
        return f"Shared({self.key!r}, {self.nbytes} bytes)"


class Payload:
    """A value's pickle and its buffers, as an engine carries them (buffers out of band)."""

    __slots__ = ("header", "buffers")

    def __init__(self, header: Any, buffers: Sequence[Any]) -> None:
        self.header = header
        self.buffers = list(buffers)

    def __reduce_ex__(self, protocol: Any) -> Tuple[Any, ...]:
        return (Payload, (bytes(self.header), [pickle.PickleBuffer(b) for b in self.buffers]))

    def value(self) -> Any:
        """The value, its buffers read-only views of this payload's (or of an aligned
        copy, for arrays that arrived misaligned)."""
        views = [memoryview(b) for b in self.buffers]
        # Only a payload that travelled (its header bytes again) may be misaligned: an
        # engine's in-process worker gets the block's own copy, whose buffers are aligned.
        if type(self.header) is bytes and b"numpy" in self.header:
            views = [_aligned(view) for view in views]
        return pickle.loads(self.header, buffers=[view.toreadonly() for view in views])


#: The alignment every numpy dtype needs; malloc gives at least this much.
_ALIGNMENT = 16


def _aligned(view: memoryview) -> memoryview:
    """``view``, or a copy of it at an address that is a multiple of :data:`_ALIGNMENT`.

    An engine may hand a buffer over at any offset of the bytes it received (Dask
    does), and numpy computes on a misaligned array through slow paths: copied once
    here, as the value is decoded once per worker, every call computes at full speed.
    """
    import numpy

    address = _address(view)
    if address is None or address % _ALIGNMENT == 0:
        return view
    return numpy.frombuffer(view, numpy.uint8).copy().data


class SharedValues:
    """One runner block's large values: a copy of each, released when no call needs it.

    This base keeps each copy in an unnamed file in memory, mapped; a runner's
    subclass says where the copy is kept (:meth:`_open`), placed for its workers
    (:meth:`_place`), and how a :class:`Shared` pickles on its way there (:meth:`reduce`).
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._token = uuid.uuid4().hex[:12]
        self._numbers = itertools.count()
        self._lock = threading.RLock()
        #: id of a value shared → (the value, kept so that its id stays its own; its Shared)
        self._by_id: Dict[int, Tuple[Any, "weakref.ref[Shared]"]] = {}
        self._copies: Dict[str, Copy] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._copies)

    def share(self, value: Any, header: bytes, buffers: List[pickle.PickleBuffer]) -> Optional[Shared]:
        """The :class:`Shared` standing for ``value`` as it is now (pickled to ``header``
        and ``buffers``), or None once the block has ended."""
        raw = [buffer.raw() for buffer in buffers]
        vid = id(value)
        with self._lock:
            if self._closed:
                return None
            known = self._by_id.get(vid)
            if known is not None and known[0] is value:
                shared = known[1]()
                if shared is not None and (
                    type(value) is bytes or self._unchanged(shared.key, header, raw)
                ):
                    return shared
            key = f"{self._token}-{next(self._numbers)}"
        # Copied and placed without the lock: placing may wait for an engine's thread,
        # which may be releasing another value meanwhile.
        copy = self._copy(key, header, raw)
        shared = Shared(key, len(header) + sum(b.nbytes for b in raw), self)
        with self._lock:
            self._copies[key] = copy
        try:
            placed = self._place(shared)
        except BaseException:
            self._release(key, None)
            raise
        if not placed:  # not from this thread: the value goes with each call
            self._release(key, None)
            return None
        with self._lock:
            if self._closed:  # the block ended meanwhile
                shared.reference = None
                self._release(key, None)
                return None
            released = functools.partial(self._released, key, vid)
            self._by_id[vid] = (value, weakref.ref(shared, released))
        return shared

    def reduce(self, shared: Shared) -> Tuple[Any, ...]:
        """How ``shared`` pickles to travel to a worker (by default: the value itself)."""
        copy = self._copy_of(shared)
        return (_loads, (bytes(copy.header), [pickle.PickleBuffer(b) for b in copy.buffers()]))

    def payload(self, shared: Shared) -> Payload:
        """What an engine is given to hold ``shared`` for its workers."""
        copy = self._copies[shared.key]
        return Payload(copy.header, copy.buffers())

    def close(self) -> None:
        """Release every copy left, and what the engine holds them by (the block has
        ended); later shares are refused."""
        with self._lock:
            self._closed = True
            for _, ref in self._by_id.values():
                shared = ref()
                if shared is not None:
                    shared.reference = None
            for key in list(self._copies):
                self._release(key, None)
            self._by_id.clear()

    # -- for subclasses ---------------------------------------------------------------------

    def _open(self, key: str) -> Tuple[int, Optional[str]]:
        """A new empty file for a copy, open for reading and writing, and its path if it
        has one (here: in memory, unnamed, where the system allows)."""
        if hasattr(os, "memfd_create"):
            return os.memfd_create(f"taskrunners-{key}"), None
        handle, path = tempfile.mkstemp(prefix=f"taskrunners-{key}-")
        os.unlink(path)
        return handle, None

    def _copy_of(self, shared: Shared) -> Copy:
        copy = self._copies.get(shared.key)
        if copy is None:
            raise RuntimeError(f"The large value {shared.key} was released with its runner's block.")
        return copy

    def _place(self, shared: Shared) -> bool:
        """Make ``shared``'s copy reachable from the workers (set ``shared.reference`` if need be);
        False if that cannot be done from this thread."""
        return True

    def _dropped(self, copy: Copy) -> None:
        """``copy`` is no longer needed: release what :meth:`_open` made."""

    # -- inside -----------------------------------------------------------------------------

    def _copy(self, key: str, header: bytes, raw: List[memoryview]) -> Copy:
        # Written to a file, then mapped: writing is faster than filling a fresh map.
        spans: List[Tuple[int, int]] = []
        end = len(header)
        for buffer in raw:
            offset = -(-end // _ALIGN) * _ALIGN
            spans.append((offset, buffer.nbytes))
            end = offset + buffer.nbytes
        handle, path = self._open(key)
        try:
            _write_at(handle, memoryview(header), 0)
            for (offset, _), buffer in zip(spans, raw):  # raw(): flat bytes, contiguous
                _write_at(handle, buffer, offset)
            os.ftruncate(handle, max(end, 1))
            memory = mmap.mmap(handle, max(end, 1))
        except BaseException:
            if path is not None:
                os.unlink(path)
            raise
        finally:
            os.close(handle)
        return MappedCopy(memory, len(header), spans, path)

    def _unchanged(self, key: str, header: bytes, raw: List[memoryview]) -> bool:
        copy = self._copies.get(key)
        if copy is None:
            return False
        kept = copy.buffers()
        if len(raw) != len(kept) or not _same_bytes(memoryview(header), copy.header, header):
            return False
        return all(_same_bytes(a, b) for a, b in zip(raw, kept))

    def _released(self, key: str, vid: int, _: "weakref.ref[Shared]") -> None:
        self._release(key, vid)

    def _release(self, key: str, vid: Optional[int]) -> None:
        with self._lock:
            copy = self._copies.pop(key, None)
            if vid is not None:
                known = self._by_id.get(vid)
                if known is not None and known[1]() is None:
                    del self._by_id[vid]
        if copy is not None:
            # Workers in this process (Dask's threads) may have loaded it: let go here
            # too, so that its memory goes now, not at the next load.
            with _loaded_lock:
                _loaded.pop(key, None)
            self._dropped(copy)
            copy.close()


def _write_at(handle: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(handle, data, offset)
        data, offset = data[written:], offset + written


def _address(view: memoryview, owner: Any = None) -> Optional[int]:
    """Where ``view``'s bytes start (``owner``: the bytes object it views, if so)."""
    if type(owner) is bytes:
        return ctypes.cast(ctypes.c_char_p(owner), ctypes.c_void_p).value
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # a read-only array's data, say
        return int(numpy.frombuffer(view, numpy.uint8).ctypes.data)
    return None


try:
    _memcmp: Any = ctypes.CDLL(None).memcmp
    _memcmp.restype = ctypes.c_int
    _memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
except (OSError, AttributeError, TypeError):  # no C library to load by name (Windows)
    _memcmp = None


def _same_bytes(a: memoryview, b: memoryview, a_owner: Any = None) -> bool:
    """Whether two flat buffers hold the same bytes (at memory speed where it can)."""
    if a.nbytes != b.nbytes:
        return False
    if not a.nbytes:
        return True
    if _memcmp is not None:
        left, right = _address(a, a_owner), _address(b)
        if left is not None and right is not None:
            return _memcmp(left, right, a.nbytes) == 0
    return a.tobytes() == b.tobytes()


class _Collected(threading.local):
    shared: Optional[List[Shared]] = None


_collected = _Collected()


class collecting:
    """While active in this thread, the :class:`Shared` values pickled are listed in it
    (an engine then hands their references over with the task: see :func:`placed`)."""

    def __init__(self) -> None:
        self.shared: List[Shared] = []

    def __enter__(self) -> List[Shared]:
        self._outer = _collected.shared
        _collected.shared = self.shared
        return self.shared

    def __exit__(self, *exc_info: Any) -> None:
        _collected.shared = self._outer


def collect(shared: Any) -> bool:
    """List ``shared`` in this thread's :class:`collecting`; False if none is active."""
    listed: Optional[List[Any]] = _collected.shared
    if listed is None:
        return False
    if all(item is not shared for item in listed):
        listed.append(shared)
    return True


def _loads(header: bytes, buffers: List[Any]) -> Any:
    return pickle.loads(header, buffers=[memoryview(b).toreadonly() for b in buffers])


# -- in a worker --------------------------------------------------------------------------

#: Values loaded in this process, by key: (value, whether it is still in use, last use).
_loaded: Dict[str, Tuple[Any, Optional[Callable[[], bool]], float]] = {}
_loaded_lock = threading.Lock()
#: A loaded value whose runner cannot be asked is dropped when unused this long (seconds).
IDLE_SECONDS = 30.0


def load(key: str, source: Callable[[], Any], alive: Optional[Callable[[], bool]] = None) -> Any:
    """The value shared under ``key`` in this process: loaded by ``source()`` the first
    time, then kept while ``alive()`` says its runner still holds it (or, without
    ``alive``, until it has been unused for :data:`IDLE_SECONDS`)."""
    now = time.monotonic()
    with _loaded_lock:
        entry = _loaded.get(key)
        if entry is not None:
            _loaded[key] = (entry[0], entry[1], now)
            return entry[0]
        _forget_unused(now)
    value = source()
    with _loaded_lock:
        _loaded[key] = (value, alive, now)
    return value



def _forget_unused(now: float) -> None:
    for key, (_, alive, used) in list(_loaded.items()):
        if now - used > IDLE_SECONDS if alive is None else not alive():
            del _loaded[key]


class _Placed(threading.local):
    payloads: Optional[Dict[str, Tuple[Any, Optional[Callable[[], bool]]]]] = None


_placed = _Placed()


class placed:
    """While active in this thread, :func:`load_placed` finds each key's payload here:
    ``{key: (payload, whether the engine still holds it)}``."""

    def __init__(self, payloads: Optional[Dict[str, Tuple[Any, Optional[Callable[[], bool]]]]]) -> None:
        self.payloads = payloads

    def __enter__(self) -> None:
        self._outer = _placed.payloads
        if self.payloads:
            _placed.payloads = self.payloads

    def __exit__(self, *exc_info: Any) -> None:
        _placed.payloads = self._outer


def _placed_entry(key: str) -> Tuple[Any, Optional[Callable[[], bool]]]:
    payloads = _placed.payloads
    if payloads is None or key not in payloads:
        raise RuntimeError(f"The large value {key} did not reach this worker with its task.")
    return payloads[key]


def placed_payload(key: str) -> Any:
    """What the engine handed over with the task for ``key`` (see :class:`placed`)."""
    return _placed_entry(key)[0]


def load_placed(key: str) -> Any:
    """The value shared under ``key``, from the payload the engine handed over with the
    task (see :class:`placed`), loaded once in this process."""
    payload, alive = _placed_entry(key)
    return load(key, payload.value, alive)
