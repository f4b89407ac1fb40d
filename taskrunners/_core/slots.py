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
import itertools
import mmap
import os
import struct
from typing import Deque, Optional, Tuple

__all__ = ["SlotTable", "mark_started", "mark_finished"]

# One slot per call: (pid of the worker that started it, pid of the one that finished
# it), 0 meaning "not yet".
_SLOT = struct.Struct("=ii")
_PID = struct.Struct("=i")


class SlotTable:
    """The parent's side: a table file of ``size`` slots at ``path``, and its free slots."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        with open(path, "w+b") as file:
            file.truncate(size * _SLOT.size)
            self._table = mmap.mmap(file.fileno(), 0)
        self._fresh = itertools.count()
        self._freed: Deque[int] = collections.deque()

    def take(self) -> Optional[int]:
        """A free slot, cleared; None if every slot is in use."""
        try:
            slot = self._freed.pop()
        except IndexError:
            slot = next(self._fresh)
            if slot >= self.size:
                self._fresh = itertools.count(self.size)  # stay exhausted until one is freed
                return None
            return slot
        _SLOT.pack_into(self._table, slot * _SLOT.size, 0, 0)
        return slot

    def give_back(self, slot: int) -> None:
        """No worker writes to ``slot`` any more (its call came back, or its pool is gone)."""
        self._freed.append(slot)

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


def mark_started(path: str, slot: int) -> None:
    """In the worker: the call in ``slot`` starts now."""
    table = _table(path)
    if table is not None:
        _PID.pack_into(table, slot * _SLOT.size, os.getpid())


def mark_finished(path: str, slot: int) -> None:
    """In the worker: the call in ``slot`` has its State."""
    table = _table(path)
    if table is not None:
        _PID.pack_into(table, slot * _SLOT.size + _PID.size, os.getpid())
