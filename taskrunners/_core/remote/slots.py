"""A slot table: which worker started and finished each call, readable after it died.

The parent gives each call it hands to a worker process a slot in a small file that
the parent and the workers of one machine map into memory. The worker writes its pid
into the slot when the call starts and again when it finishes. When a worker dies,
its engine only says that the whole engine task failed; the table tells, call by
call, which calls had started (the one running is Crashed, naming the cause), which
had finished (their results were lost with the worker) and which never started (they
run again elsewhere), so that no call ever runs twice.

A call with a time limit that passes it ends its worker (the worker's watchdog acts,
see :class:`Marks`): it marks the call timed out (``-pid`` as the finishing
pid), leaves the outcomes of the calls of its batch that had finished in a small file
beside the table (:func:`done_path`; an engine sends a batch's results back together,
so they would be lost with the worker), and exits with :data:`TIMED_OUT_EXIT_CODE`.
The parent reads both after the death (:meth:`SlotTable.timed_out`,
:meth:`SlotTable.left_outcomes`): the timed-out call is TimedOut, the finished ones
are delivered, the others run again. The process is killed: the call's ``finally``
blocks do not run.

A worker that cannot open the table (it runs on another machine) marks nothing and
leaves no file (at a limit, it still ends itself); the parent then knows only what
its engine tells it.
"""

from __future__ import annotations

import collections
import functools
import mmap
import os
import struct
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

from taskrunners._core.limits import Alarm, Limited, split_limit, watchdog
from taskrunners._core.remote.protocol import Expire, decode_batch, encode_batch
from taskrunners._core.running import is_coroutine_function
from taskrunners.states import State

__all__ = ["TIMED_OUT_EXIT_CODE", "done_path", "SlotTable", "Marks"]

#: The exit code of a worker process that ended itself because a call of it went past
#: its time limit (as GNU ``timeout`` exits).
TIMED_OUT_EXIT_CODE = 124


def done_path(table_path: str, first_slot: int, pid: int) -> str:
    """Where worker ``pid``, running the batch whose slots start at ``first_slot``,
    leaves the outcomes of its finished calls when a call of it times out (the pid
    tells it from a file an earlier batch in those slots may have left)."""
    return f"{table_path}-{first_slot}-{pid}.done"

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
        """(pid that started the call in ``slot``, pid that finished it), 0 for not yet;
        the second is ``-pid`` for a call that went past its time limit there."""
        started, finished = _SLOT.unpack_from(self._table, slot * _SLOT.size)
        return started, finished

    def timed_out(self, slot: int) -> bool:
        """Whether the call in ``slot`` went past its time limit (its worker ended)."""
        return _SLOT.unpack_from(self._table, slot * _SLOT.size)[1] < 0

    def left_outcomes(
        self, slots: range, names: Sequence[str]
    ) -> Tuple[List[Tuple[State, float]], Optional[List[Any]]]:
        """What the worker of a batch (``slots``, its calls ``names``) left when a call of
        it timed out: the States and seconds of the calls before that one, in order, and
        their log records; nothing if it left no file. The file is removed."""
        pid = self.marks(slots.start)[0] if len(slots) else 0
        if not pid:
            return [], None
        path = done_path(self.path, slots.start, pid)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError:
            return [], None
        try:
            os.unlink(path)
        except OSError:
            pass
        outcomes, records = decode_batch(names, data)
        return list(outcomes), records

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
    """In the worker: marks the calls of one batch started and finished in their slots,
    and ends the worker when one of them goes past its time limit.

    :param path: the table's path, or None when the batch has no slots
    :param slots: the batch's slots, one per call in order

    Limits: :meth:`watch` says what to leave behind at a limit, and takes the plain
    calls' limits out of their run_fns (:meth:`limits`): this object watches them,
    with one watchdog alarm for the whole batch, moved on as each call starts (a
    call costs a clock read, not an alarm). A coroutine call keeps its limit, for
    ``run_batch`` to cancel it on its loop, with :meth:`expiry` as its ``expire``.
    """

    __slots__ = (
        "_table", "_path", "_slots", "_pid", "_lock", "_finished", "_limits", "_timed",
        "_deadline", "_alarm", "_over", "_left",
    )

    def __init__(self, path: Optional[str], slots: Optional[range]) -> None:
        self._table = _table(path) if path is not None and slots is not None else None
        self._path = path
        self._slots = slots if slots is not None else range(0)
        self._pid = os.getpid()
        # The watchdog's thread ends the worker unless the call finished first.
        self._lock = threading.Lock()
        self._finished = -1  # the index of the last call finished
        # The limit of each plain call this object watches (None: none), the last such
        # call started, and when its limit passes.
        self._limits: Optional[List[Optional[float]]] = None
        self._timed = -1
        self._deadline = 0.0
        self._alarm: Optional[Alarm] = None
        self._over = False
        # What to leave beside the table at a limit: (names, outcomes, records, where).
        self._left: Tuple[Sequence[str], List[Tuple[State, float, Any]], List[Any], str] = ((), [], [], "")

    def watch(
        self,
        names: Sequence[str],
        outcomes: List[Tuple[State, float, Any]],
        records: List[Any],
        where: str,
    ) -> None:
        """At a limit, leave the outcomes of the calls before the late one (``outcomes``,
        the list ``run_batch`` fills, and the log records so far) beside the table."""
        self._left = (names, outcomes, records, where)

    def limits(self, calls: List[Tuple[Callable[..., Any], Any]]) -> List[Tuple[Callable[..., Any], Any]]:
        """``calls`` with the limits of their plain run_fns taken out, to be watched here."""
        limits: List[Optional[float]] = []
        found = False
        unwrapped = []
        given: Any = None  # the calls of a batch mostly share their run_fn: looked at once
        run_fn: Callable[..., Any] = _nothing
        seconds: Optional[float] = None
        for each, run_kwargs in calls:
            if each is not given:
                given, run_fn, seconds = each, each, None
                if type(each) is Limited and not is_coroutine_function(each.run_fn):
                    run_fn, seconds = split_limit(each)
                    found = True
            limits.append(seconds)
            unwrapped.append((run_fn, run_kwargs))
        if not found:
            return calls
        self._limits = limits
        return unwrapped

    def started(self, index: int) -> bool:
        """Call ``index`` starts now (True: it may)."""
        if self._table is not None:
            _PID.pack_into(self._table, self._slots[index] * _SLOT.size, self._pid)
        limits = self._limits
        if limits is not None:
            seconds = limits[index]
            if seconds is not None:
                # The deadline first: the watchdog reads the call, then its deadline.
                deadline = self._deadline = time.monotonic() + seconds
                self._timed = index
                alarm = self._alarm
                if alarm is None or deadline < alarm.deadline:  # the first, or a shorter limit
                    with self._lock:
                        self._arm(seconds)
        return True

    def _arm(self, seconds: float) -> None:
        # With the lock held: one alarm at a time, the one armed last.
        old, self._alarm = self._alarm, watchdog().arm(seconds, self._check)
        if old is not None:
            old.cancel()

    def finished(self, index: int) -> None:
        """Call ``index`` has its State."""
        with self._lock:
            self._finished = index
            if self._table is not None:
                _PID.pack_into(self._table, self._slots[index] * _SLOT.size + _PID.size, self._pid)

    def close(self) -> None:
        """The batch is over: no call of it is watched any more."""
        with self._lock:
            self._over = True
            alarm, self._alarm = self._alarm, None
        if alarm is not None:
            alarm.cancel()

    def _check(self) -> None:
        # On the watchdog's thread, at the deadline the alarm was armed for: end the
        # worker if the call watched is late, else move the alarm on to its deadline.
        with self._lock:
            if self._over:
                return
            timed = self._timed
            running = timed > self._finished
            now = time.monotonic()
            if running and now >= self._deadline:
                self._expire_locked(timed)
            limits = self._limits
            if running:
                delay = self._deadline - now
            else:  # between calls: the next one re-arms if its limit is shorter than this
                delay = min((seconds for seconds in limits or () if seconds is not None), default=1.0)
            self._arm(max(delay, 0.0))

    def expiry(self, index: int) -> Expire:
        """``run_batch``'s ``expire`` of a coroutine call ``index``: see :meth:`_expire_locked`."""
        return functools.partial(_expire_call, self, index)

    def _expire(self, index: int) -> None:
        with self._lock:
            self._expire_locked(index)

    def _expire_locked(self, index: int) -> None:
        """Call ``index`` went past its limit: unless it finished meanwhile, mark it timed
        out, leave the outcomes of the calls before it beside the table, and end the
        worker at once (``finally`` blocks do not run); with the lock held, so that the
        call cannot finish meanwhile.

        Without a table (another machine) the worker ends all the same; the parent
        then sees a worker that died, which may have been the limit.
        """
        if self._finished >= index:
            return
        table = self._table
        if table is not None and self._path is not None:
            names, outcomes, records, where = self._left
            if index and outcomes:
                try:
                    _leave(done_path(self._path, self._slots.start, self._pid), names, outcomes[:index], records, where)
                except Exception:  # the parent then reports those calls lost
                    pass
            _PID.pack_into(table, self._slots[index] * _SLOT.size + _PID.size, -self._pid)
        os._exit(TIMED_OUT_EXIT_CODE)


def _nothing() -> None:
    return None


def _expire_call(marks: Marks, index: int, guard: object) -> None:
    marks._expire(index)


def _leave(
    path: str,
    names: Sequence[str],
    outcomes: List[Tuple[State, float, Any]],
    records: List[Any],
    where: str,
) -> None:
    # Written under another name, then renamed: the parent never reads half a file.
    done = [(state, seconds) for state, seconds, _ in outcomes]
    data = encode_batch(names[: len(done)], done, list(records), where)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)
