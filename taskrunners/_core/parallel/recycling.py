"""Worker recycling on the Parallel runner: by calls run, and by resident memory.

- :func:`check_max_calls_per_worker` and :func:`check_worker_memory_limit` validate the
  runner's settings (a memory limit may be written ``"200MB"`` or ``"1.5GiB"``).
- :class:`CappedDurations`: batches no larger than ``max_calls_per_worker``, so that a
  worker never goes past it.
- :class:`MemoryWatch`, in a worker process: after each call, reads the worker's
  resident memory (psutil); once it is above the limit the worker starts no other
  call, and the parent replaces it. The call that took a fresh worker past the limit
  on its own is Crashed (:func:`over_limit_state`): a new worker would not help.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Hashable, List, Optional, Sequence, Set, Tuple

from taskrunners._core.batching import BatchSize, Durations
from taskrunners._core.remote.slots import Marks
from taskrunners.states import Crashed, State

__all__ = [
    "check_max_calls_per_worker",
    "check_worker_memory_limit",
    "format_bytes",
    "over_limit_state",
    "MemoryWatch",
    "CappedDurations",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def check_max_calls_per_worker(value: Any) -> Optional[int]:
    """:raises ValueError: unless ``value`` is None or a positive integer"""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(
        f"`max_calls_per_worker` must be a positive integer or None, got {value!r}. "
        "A worker process is replaced after running that many calls; None keeps it."
    )


def check_worker_memory_limit(value: Any) -> Optional[int]:
    """The limit in bytes: from bytes, or a string such as ``"200MB"``, ``"1.5GiB"``.

    :raises ValueError: unless ``value`` is None, a positive integer or such a string
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is not None and match[2].lower() in _UNITS:
            size = int(float(match[1]) * _UNITS[match[2].lower()])
            if size >= 1:
                return size
    raise ValueError(
        f"`worker_memory_limit` must be a positive number of bytes, a string such as "
        f'"200MB", "2GB" or "1.5GiB", or None, got {value!r}.'
    )


def format_bytes(size: int) -> str:
    """``size`` bytes in MB, GB, ...: ``"200 MB"``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} B"


def over_limit_state(name: str, pid: int, resident: int, limit: int) -> State:
    """A call that took a fresh worker past ``worker_memory_limit`` on its own."""
    message = (
        f"Task run {name!r} took worker process (pid {pid}) to {format_bytes(resident)} of "
        f"resident memory, above worker_memory_limit={format_bytes(limit)}, as the first "
        "call of that worker: a fresh worker would go past the limit again. Its result "
        "was dropped and the worker replaced. Raise worker_memory_limit, or have the "
        "call keep less memory."
    )
    return Crashed(message=message, data=MemoryError(message))


class MemoryWatch:
    """In a worker process: whether its resident memory went above ``limit`` after a call.

    One per process (the worker's calls so far count); :meth:`wrap` adds it to the
    slot table's marks of each batch.
    """

    def __init__(self, limit: int) -> None:
        import psutil

        self.limit = limit
        self.resident = 0  # above the limit once set: the worker runs no other call
        self._process = psutil.Process()
        self._calls = 0
        #: Indexes, in the current batch, of calls that went past the limit alone.
        self.alone: Set[int] = set()

    def wrap(self, marks: Marks) -> Tuple[Callable[[int], bool], Callable[[int], None]]:
        """The ``starting`` and ``finished`` callbacks of a batch marked by ``marks``."""

        def starting(index: int) -> bool:
            return not self.resident and marks.started(index)

        def finished(index: int) -> None:
            marks.finished(index)
            self._finished(index)

        return starting, finished

    def _finished(self, index: int) -> None:
        self._calls += 1
        resident = self._process.memory_info().rss
        if resident > self.limit:
            self.resident = resident
            if self._calls == 1:
                self.alone.add(index)

    def crash_alone(self, names: Sequence[str], outcomes: List[Tuple[State, float]]) -> None:
        """Replace the outcome of each call that went past the limit alone by a Crashed."""
        for index in self.alone:
            outcomes[index] = (
                over_limit_state(names[index], os.getpid(), self.resident, self.limit),
                outcomes[index][1],
            )
        self.alone.clear()


class CappedDurations(Durations):
    """Batch sizes no larger than ``cap`` (``max_calls_per_worker``)."""

    def __init__(self, batch_size: BatchSize, cap: int) -> None:
        super().__init__(batch_size)
        self._cap = cap

    def size(self, key: Hashable) -> int:
        return min(self._cap, super().size(key))
