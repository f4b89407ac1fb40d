"""Many small calls as few engine tasks: gathering calls into batches while workers are busy.

A runner that sends calls to other processes (Parallel, Dask, Ray) hands each call
that is ready to run (its upstream calls done) to its :class:`Dispatcher`. The
dispatcher keeps at most ``limit`` engine tasks out at a time:

- while fewer are out, a call goes at once, alone: a lone call never waits for a
  batch to fill;
- while ``limit`` are out (every worker busy), calls gather, grouped by the task
  they belong to and their per-call options (calls with different options never
  share a batch); each engine task that comes back lets the oldest group send one
  batch: as many of its calls as the group's batch size allows, and no more than
  its share of what waits, so the last batches of a burst are spread over the
  workers;
- a call somebody waits for is sent at once (:meth:`Dispatcher.expedite`), with
  the calls gathered before it in its group.

The batch size of ``"auto"`` is learned per task from how long its calls take in
the workers (:class:`Durations`): the first calls of a new task go alone, calls of
a millisecond or less go by the hundreds, calls of :data:`TARGET_SECONDS` or more
one per engine task. ``batch_size=1`` keeps the limit and sends every call alone.
"""

from __future__ import annotations

import collections
import math
import threading
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    Hashable,
    List,
    Optional,
    Protocol,
    Sequence,
    TypeVar,
    Union,
)

from typing_extensions import Literal

__all__ = [
    "BatchSize",
    "TARGET_SECONDS",
    "MAX_CALLS",
    "check_batch_size",
    "batch_key_of",
    "batch_keys_of",
    "Durations",
    "Sendable",
    "OwnEntry",
    "Entry",
    "group_of",
    "Dispatcher",
]

BatchSize = Union[int, Literal["auto"]]

#: A batch of ``"auto"`` size aims at about this much work: long enough that an engine
#: task's own cost is small beside it, short enough that workers finish together.
TARGET_SECONDS = 0.1
#: The most calls one batch holds, however short they are.
MAX_CALLS = 1000
# Calls whose task is not weak-referenceable (a builtin): this many tasks remembered.
_STRONG_KEYS = 256


def check_batch_size(batch_size: Any) -> BatchSize:
    """:raises ValueError: unless ``batch_size`` is ``"auto"`` or a positive integer"""
    if batch_size == "auto" and isinstance(batch_size, str):
        return "auto"
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        return batch_size
    raise ValueError(
        f'`batch_size` must be "auto" or a positive integer, got {batch_size!r}. Use "auto" '
        "(the default) to group short calls into one engine task, or 1 to send every call "
        "as an engine task of its own."
    )


def batch_key_of(run_fn: Any, run_kwargs: Dict[str, Any]) -> Hashable:
    """The task a call belongs to, for batching and for learning how long it takes.

    The ``run_fn``, unless it names another with a ``__batch_key__(run_kwargs)``
    attribute: the task behind the flows' wrapper, the function behind
    ``RunnerExecutor``'s, so that two tasks run through one wrapper are told apart.
    """
    key_of = getattr(run_fn, "__batch_key__", None)
    if key_of is not None:
        try:
            return key_of(run_kwargs)
        except Exception:
            pass
    return run_fn


def batch_keys_of(run_fn: Any, run_kwargs_list: Sequence[Dict[str, Any]]) -> List[Hashable]:
    """:func:`batch_key_of` for many calls of one ``run_fn``."""
    key_of = getattr(run_fn, "__batch_key__", None)
    if key_of is None:
        return [run_fn] * len(run_kwargs_list)
    try:
        return list(map(key_of, run_kwargs_list))
    except Exception:
        return [batch_key_of(run_fn, run_kwargs) for run_kwargs in run_kwargs_list]


class Durations:
    """How long the calls of each task take, as workers measured them; the batch size."""

    def __init__(self, batch_size: BatchSize) -> None:
        self.batch_size = batch_size
        self._lock = threading.Lock()
        # Per task: (mean seconds per call, calls measured), moving with the latest.
        self._weak: "weakref.WeakKeyDictionary[Any, List[float]]" = weakref.WeakKeyDictionary()
        self._strong: "collections.OrderedDict[Hashable, List[float]]" = collections.OrderedDict()

    def record(self, key: Hashable, seconds: float, calls: int = 1) -> None:
        """``calls`` calls of ``key`` took ``seconds`` in all, in a worker."""
        if calls < 1:
            return
        per_call = seconds / calls
        with self._lock:
            stats = self._stats(key)
            if stats is None:
                return
            mean, seen = stats
            # The newest batches count most: a task's calls may grow slower or faster.
            weight = min(0.5, calls / (seen + calls)) if seen else 1.0
            stats[0] = mean + weight * (per_call - mean)
            stats[1] = seen + calls

    def size(self, key: Hashable) -> int:
        """How many calls of ``key`` one batch may hold."""
        if self.batch_size != "auto":
            return self.batch_size
        with self._lock:
            stats = self._stats(key, create=False)
        if stats is None or not stats[1]:
            return 1  # the first calls of a new task go alone, to be measured
        mean = stats[0]
        if mean <= 0:
            return MAX_CALLS
        return max(1, min(MAX_CALLS, int(TARGET_SECONDS / mean)))

    def _stats(self, key: Hashable, create: bool = True) -> Optional[List[float]]:
        try:
            stats = self._weak.get(key)
            if stats is None and create:
                stats = self._weak[key] = [0.0, 0]
            return stats
        except TypeError:  # not weak-referenceable: kept among the latest few
            pass
        stats = self._strong.get(key)
        if stats is None and create:
            stats = self._strong[key] = [0.0, 0]
            while len(self._strong) > _STRONG_KEYS:
                self._strong.popitem(last=False)
        return stats


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Sendable(Protocol[T_co]):
    """What the dispatcher gathers and sends: a call, its task and group, and what the
    backend sends for it. An :class:`Entry`, or a call handle that is its own entry
    (one object less per call)."""

    @property
    def call(self) -> Any: ...

    @property
    def key(self) -> Hashable: ...

    @property
    def group(self) -> Hashable: ...

    @property
    def item(self) -> T_co: ...


E = TypeVar("E", bound=Sendable[Any])


class OwnEntry:
    """A mixin for call handles that are their own :class:`Sendable` (they set ``key``
    and ``group``; nothing else is sent for them)."""

    __slots__ = ()

    @property
    def call(self) -> Any:
        return self

    @property
    def item(self) -> None:
        return None


def group_of(key: Hashable, options: Hashable) -> Hashable:
    """The group of a call: its task, and its options if any (no tuple without)."""
    return key if options is None else (key, options)


class Entry(Generic[T]):
    """One call waiting to go: its handle, its group, and what the backend sends."""

    __slots__ = ("call", "group", "key", "item")

    def __init__(self, call: Any, key: Hashable, options: Hashable, item: T) -> None:
        self.call = call
        self.key = key
        self.group = group_of(key, options)
        self.item = item


class Dispatcher(Generic[E]):
    """Keeps at most ``limit`` engine tasks out; gathers the calls that come meanwhile.

    :param limit: the most engine tasks out at once (busy workers, plus a queue's worth)
    :param send: sends one batch (a list of entries) as one engine task; called outside
        the dispatcher's lock, from the thread that submitted, finished or expedited
        (a backend moves it to a thread of its own where its engine needs that)
    :param durations: what sizes ``"auto"`` batches
    """

    def __init__(
        self,
        limit: int,
        send: Callable[[List[E]], None],
        durations: Durations,
    ) -> None:
        self.limit = max(1, limit)
        self._send = send
        self.durations = durations
        self._lock = threading.Lock()
        self._out = 0
        self._groups: "collections.OrderedDict[Hashable, collections.OrderedDict[Any, E]]" = (
            collections.OrderedDict()
        )
        self._group_of: Dict[Any, Hashable] = {}

    @property
    def out(self) -> int:
        """Engine tasks sent and not back yet."""
        return self._out

    @property
    def gathered(self) -> int:
        """Calls waiting to be sent."""
        return len(self._group_of)

    def submit(self, entry: E) -> None:
        """A call is ready to run: send it now if there is room, else gather it."""
        with self._lock:
            if self._out < self.limit and not self._group_of:
                self._out += 1
                batch: Optional[List[E]] = [entry]
            else:
                self._gather(entry)
                batch = self._next_batch() if self._out < self.limit else None
        if batch:
            self._send(batch)

    def submit_many(self, entries: Sequence[E]) -> None:
        """Many calls are ready at once (``task.map``): as :meth:`submit`, in one go."""
        batches: List[List[E]] = []
        with self._lock:
            for entry in entries:
                if self._out < self.limit and not self._group_of:
                    self._out += 1
                    batches.append([entry])
                else:
                    self._gather(entry)
            while self._out < self.limit:
                batch = self._next_batch()
                if batch is None:
                    break
                batches.append(batch)
        for batch in batches:
            self._send(batch)

    def _gather(self, entry: E) -> None:
        group = self._groups.get(entry.group)
        if group is None:
            group = self._groups[entry.group] = collections.OrderedDict()
        group[entry.call] = entry
        self._group_of[entry.call] = entry.group

    def task_done(self) -> None:
        """An engine task came back (whatever its outcome): send the next batch, if any."""
        with self._lock:
            self._out -= 1
            batch = self._next_batch() if self._out < self.limit else None
        if batch:
            self._send(batch)

    def expedite(self, call: Any) -> None:
        """Somebody waits for ``call``: if it is gathered, send it now, with those before it."""
        with self._lock:
            group_key = self._group_of.get(call)
            if group_key is None:
                return
            group = self._groups[group_key]
            entry = group.pop(call)
            del self._group_of[call]
            batch = [entry, *self._take(group_key, group, self.durations.size(entry.key) - 1)]
            self._out += 1
        self._send(batch)

    def drop_gathered(self) -> List[E]:
        """Forget every gathered call (the block is left); they are returned, unsent."""
        with self._lock:
            entries = [entry for group in self._groups.values() for entry in group.values()]
            self._groups.clear()
            self._group_of.clear()
        return entries

    def _next_batch(self) -> Optional[List[E]]:
        # Under the lock, with room for one more engine task.
        while self._groups:
            group_key, group = next(iter(self._groups.items()))
            key = next(iter(group.values())).key
            # No more than this group's share of the engine tasks that may be out: the
            # last batches of a burst go to every worker, not to the first one.
            share = math.ceil(len(group) / self.limit)
            batch = self._take(group_key, group, min(self.durations.size(key), share))
            if batch:
                self._out += 1
                return batch
        return None

    def _take(
        self, group_key: Hashable, group: "collections.OrderedDict[Any, E]", count: int
    ) -> List[E]:
        batch: List[E] = []
        while group and len(batch) < count:
            call, entry = group.popitem(last=False)
            del self._group_of[call]
            if not call.done():  # cancelled while it was gathered: dropped here
                batch.append(entry)
        if not group:
            del self._groups[group_key]
        else:  # the other groups go first next time
            self._groups.move_to_end(group_key)
        return batch
