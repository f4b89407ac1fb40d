"""A slot table: which worker started and finished each call, readable after it died.

The parent gives each call it hands to a worker process a slot in a small file that
the parent and the workers of one machine map into memory. The worker writes its pid
into the slot when the call starts and again when it finishes. When a worker dies,
its engine only says that the whole engine task failed; the table tells, call by
call, which calls had started (the one running is Crashed, naming the cause), which
had finished (their results were lost with the worker) and which never started (they
run again elsewhere), so that no call ever runs twice.

A worker that cannot open the table (it runs on another machine) marks nothing; the
parent then knows only what its engine tells it.
"""

from __future__ import annotations

import collections
import mmap
import os
import struct
from typing import Deque, Optional, Tuple

__all__ = ["SlotTable", "Marks"]

# One slot per call: (pid of the worker that started it, pid of the one that finished
# it), 0 meaning "not yet".
_SLOT = struct.Struct("=ii")
_PID = struct.Struct("=i")


class SlotTable:
    """The parent's side: a table file at ``path`` of ``runs`` runs of ``run_size`` slots.

    A batch of calls takes one run, a slot for each of its calls, and gives it back
    whole: one step per batch, not per call.
    """

    def __init__(self, path: str, runs: int, run_size: int) -> None:
        self.path = path
        self.run_size = run_size
        with open(path, "w+b") as file:
            file.truncate(runs * run_size * _SLOT.size)
            self._table = mmap.mmap(file.fileno(), 0)
        self._free: Deque[int] = collections.deque(range(0, runs * run_size, run_size))

    def take(self, count: int) -> Optional[range]:
        """The slots of ``count`` calls, cleared; None if every run is in use, or a run
        holds fewer slots."""
        if count > self.run_size:
            return None
        try:
            first = self._free.pop()
        except IndexError:
            return None
        self._table[first * _SLOT.size : (first + count) * _SLOT.size] = bytes(count * _SLOT.size)
        return range(first, first + count)

    def give_back(self, slots: range) -> None:
        """No worker writes to ``slots`` any more (their calls came back, or their pool is gone)."""
        self._free.append(slots.start)

    def marks(self, slot: int) -> Tuple[int, int]:
        """(pid that started the call in ``slot``, pid that finished it), 0 for not yet."""
        started, finished = _SLOT.unpack_from(self._table, slot * _SLOT.size)
        return started, finished

    def close(self) -> None:
        self._table.close()


# -- in the worker -------------------------------------------------------------------

# Tables this worker has open, the latest few: a worker may outlive many runners.
_opened: "collections.OrderedDict[str, Optional[mmap.mmap]]" = collections.OrderedDict()
_KEPT_OPEN = 8


def _table(path: str) -> Optional[mmap.mmap]:
    if path in _opened:
        return _opened[path]
    try:
        with open(path, "r+b") as file:
            table: Optional[mmap.mmap] = mmap.mmap(file.fileno(), 0)
    except OSError:  # another machine: nothing to mark
        table = None
    _opened[path] = table
    while len(_opened) > _KEPT_OPEN:
        _, old = _opened.popitem(last=False)
        if old is not None:
            old.close()
    return table


class Marks:
    """In the worker: marks the calls of one batch started and finished in their slots.

    :param path: the table's path, or None when the batch has no slots
    :param slots: the batch's slots, one per call in order
    """

    __slots__ = ("_table", "_slots", "_pid")

    def __init__(self, path: Optional[str], slots: Optional[range]) -> None:
        self._table = _table(path) if path is not None and slots is not None else None
        self._slots = slots if slots is not None else range(0)
        self._pid = os.getpid()

    def started(self, index: int) -> bool:
        """Call ``index`` starts now (True: it may)."""
        if self._table is not None:
            _PID.pack_into(self._table, self._slots[index] * _SLOT.size, self._pid)
        return True

    def finished(self, index: int) -> None:
        """Call ``index`` has its State."""
        if self._table is not None:
            _PID.pack_into(self._table, self._slots[index] * _SLOT.size + _PID.size, self._pid)
