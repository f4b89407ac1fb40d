"""A call's arguments as they were at ``submit``, for the runners that send calls later.

The process-based runners (Parallel, Dask, Ray) pickle a call when it leaves for a
worker, which may be long after ``submit``: while it waits in a batch, or in the
engine's own queue (Dask serializes on its event loop). A value the caller changes
meanwhile would reach the call changed. So at ``submit`` every argument that could
change is taken as it is then:

- values that cannot change (numbers, strings, bytes, None, functions, classes)
  are kept as they are, at no cost: the common case of many small calls;
- lists, dicts and sets of such values are copied, tuples of them kept;
- anything else is pickled at once into a :class:`Frozen` value, which unpickles
  as the value itself wherever it lands (a worker, or this process); or, when the
  memo carries the runner's :class:`~taskrunners._core.remote.sharing.SharedValues`
  and the pickle weighs its threshold or more (bytes too), into a shared value that
  each worker receives once (see :mod:`~taskrunners._core.remote.sharing`);
- a collection holding futures is rebuilt around them (the runner replaces them
  when the call is sent);
- a value that cannot be pickled is kept as it is, and fails with the runner's own
  pickling error when the call is sent.

An object may take its own snapshot with a ``__snapshot__(memo)`` method (a flow's
task invocation snapshots each of its arguments, not its task).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import sys
import threading
import types
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, TypeVar

import cloudpickle

from taskrunners._collections import iter_leaves
from taskrunners._core.remote.protocol import Upstream
from taskrunners._core.remote.sharing import Shared, SharedValues
from taskrunners._core.futures import PrefectFuture
from taskrunners.states import State

__all__ = [
    "Frozen", "Memo", "snapshot", "snapshot_each", "snapshot_call", "snapshot_kwargs",
    "shared_state", "maybe_large", "unchanging", "all_unchanging",
]  # fmt: skip

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class Frozen:
    """A value pickled at submit; it unpickles as the value it was.

    ``shared``: the large values found inside it, each pickled as its runner shares it
    (see :class:`_SharingPickler`), in the order the pickle refers to them;
    ``buffers``: the (small) buffers the pickle left out of band, copied.
    """

    __slots__ = ("data", "shared", "buffers")

    def __init__(
        self, data: bytes, shared: Tuple[Shared, ...] = (), buffers: Tuple[bytes, ...] = ()
    ) -> None:
        self.data = data
        self.shared = shared
        self.buffers = buffers

    def __reduce__(self) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        if self.shared or self.buffers:
            return (_loads_with, (self.data, self.shared, self.buffers))
        return (pickle.loads, (self.data,))

    def __sizeof__(self) -> int:
        # What it weighs when sent (Dask's warning about large graphs reads this).
        return object.__sizeof__(self) + sys.getsizeof(self.data)

    def __repr__(self) -> str:
        return f"Frozen({len(self.data)} bytes)"


class _Inner(threading.local):
    values: Sequence[Any] = ()


_inner = _Inner()


def _loads_with(data: bytes, values: Sequence[Any], buffers: Sequence[bytes]) -> Any:
    """``data`` unpickled, the large values inside it being ``values`` (loaded first)."""
    outer, _inner.values = _inner.values, values
    try:
        return pickle.loads(data, buffers=[bytearray(buffer) for buffer in buffers])
    finally:
        _inner.values = outer


def _inner_value(index: int) -> Any:
    return _inner.values[index]


class _SharingPickler(cloudpickle.Pickler):
    """Pickles a value for a snapshot, sharing the large arrays inside it (anything with
    ``nbytes`` of the runner's threshold or more): each becomes a reference to its
    :class:`Shared`, listed in :attr:`shared`. The buffers of the value itself go out
    of band, to ``buffer_callback``."""

    def __init__(
        self, file: Any, sharing: SharedValues, top: Any, buffer_callback: Any, memo: Optional[Memo]
    ) -> None:
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self.sharing = sharing
        self.top = top
        self.taken = memo  # not "memo": the pickler has its own
        self.shared: List[Shared] = []

    def reducer_override(self, obj: Any) -> Any:
        # Not called for numbers, strings, bytes, lists, tuples, dicts and sets.
        nbytes = getattr(obj, "nbytes", None)
        if type(nbytes) is int and nbytes >= self.sharing.threshold and obj is not self.top:
            taken = None if self.taken is None else self.taken.get(id(obj))
            if taken is not None and type(taken[1]) is Shared:
                shared: Optional[Shared] = taken[1]
            else:
                buffers: List[pickle.PickleBuffer] = []
                data = cloudpickle.dumps(obj, 5, buffer_callback=buffers.append)
                shared = self.sharing.share(obj, data, buffers)
                if shared is not None and self.taken is not None:
                    self.taken[id(obj)] = (obj, shared)
            if shared is not None:
                self.shared.append(shared)
                return (_inner_value, (len(self.shared) - 1,))
        return super().reducer_override(obj)


# Kept as they are: they do not change once made (a future is replaced by the runner);
# more with @unchanging.
_UNCHANGING: FrozenSet[type] = frozenset(
    {
        str, bytes, int, float, bool, complex, type(None), range,
        types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
        type, Frozen, Upstream, PrefectFuture, Shared,
    }
)  # fmt: skip


C = TypeVar("C", bound=type)


def unchanging(kind: C) -> C:
    """A class decorator: values of ``kind`` are kept as they are (they cannot change)."""
    global _UNCHANGING
    _UNCHANGING = _UNCHANGING | {kind}
    return kind


def all_unchanging(values: Iterable[Any]) -> bool:
    """Whether none of ``values`` can change once made (nothing to snapshot)."""
    return _UNCHANGING.issuperset(map(type, values))


class Memo(Dict[int, Tuple[Any, Any]]):
    """Snapshots already taken, by the id of their value (kept in it, so the id stays
    its own): calls submitted together (``task.map``) share one of a value they share.

    :param sharing: where the runner keeps large values for its workers, if it does
    """

    __slots__ = ("sharing",)

    def __init__(self, sharing: Optional[SharedValues] = None) -> None:
        super().__init__()
        self.sharing = sharing


def _large_bytes(value: Any, sharing: Optional[SharedValues]) -> bool:
    # Bytes cannot change, so they are kept as they are, unless they are large enough
    # to be shared.
    return type(value) is bytes and sharing is not None and len(value) >= sharing.threshold


def snapshot_call(
    run_fn: Callable[..., Any],
    run_kwargs: Dict[str, Any],
    memo: Optional[Memo] = None,
    sharing: Optional[SharedValues] = None,
) -> Tuple[Callable[..., Any], Dict[str, Any]]:
    """``run_fn`` and ``run_kwargs`` as they are now, for a call that is sent later;
    with ``sharing`` (and no ``memo``), a memo is made only if a value needs one."""
    own = _own_snapshot(type(run_fn))
    if own is not None:
        if memo is None and sharing is not None:
            memo = Memo(sharing)
        run_fn = own(run_fn, memo)
    return run_fn, snapshot_kwargs(run_kwargs, memo, sharing if memo is None else memo.sharing)


def snapshot_kwargs(
    run_kwargs: Dict[str, Any], memo: Optional[Memo] = None, sharing: Optional[SharedValues] = None
) -> Dict[str, Any]:
    """``run_kwargs`` as they are now (themselves, if none of them can change)."""
    taken: Optional[Dict[str, Any]] = None
    for name, value in run_kwargs.items():
        if type(value) in _UNCHANGING and not _large_bytes(value, sharing):
            continue
        if memo is None and sharing is not None:  # made only when a value needs it
            memo = Memo(sharing)
        now = snapshot(value, memo)
        if now is not value:
            if taken is None:
                taken = dict(run_kwargs)
            taken[name] = now
    return run_kwargs if taken is None else taken


def snapshot(value: Any, memo: Optional[Memo] = None) -> Any:
    """``value`` as it is now (see the module's docstring for what that takes)."""
    kind = type(value)
    if kind in _UNCHANGING and not _large_bytes(value, None if memo is None else memo.sharing):
        return value
    own = _own_snapshot(kind)
    if own is not None:
        return own(value, memo)
    if memo is None:
        return _take(value, kind, None)
    taken = memo.get(id(value))
    if taken is None:
        taken = memo[id(value)] = (value, _take(value, kind, memo))
    return taken[1]


# Each type's __snapshot__ (or None), for the types seen: a few hundred at most.
_own_snapshots: Dict[type, Optional[Callable[[Any, Optional[Memo]], Any]]] = {}
_TYPES_KEPT = 512


def _own_snapshot(kind: type) -> Optional[Callable[[Any, Optional[Memo]], Any]]:
    try:
        return _own_snapshots[kind]
    except KeyError:
        pass
    own = getattr(kind, "__snapshot__", None)
    if len(_own_snapshots) < _TYPES_KEPT:
        _own_snapshots[kind] = own
    return own


def shared_state(state: State, sharing: SharedValues) -> State:
    """``state`` with its data shared if it is large (an upstream result that calls
    take); a cheap look at the data's size first spares small data a pickle."""
    data = state.data
    if type(data) in _UNCHANGING and not isinstance(data, (bytes, str)):
        return state
    if not maybe_large(data, sharing.threshold):
        return state
    taken = snapshot(data, Memo(sharing))
    if type(taken) is not Shared:
        return state
    return State(state.type, state.name, state.message, taken)


def maybe_large(value: Any, threshold: int, depth: int = 2) -> bool:
    """A cheap guess at whether ``value`` pickles to ``threshold`` bytes or more."""
    if isinstance(value, (bytes, bytearray, str)):
        return len(value) >= threshold
    nbytes = getattr(value, "nbytes", None)  # arrays
    if isinstance(nbytes, int):
        return nbytes >= threshold
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return len(value) * 128 >= threshold  # a guess: the pickle tells
    if sys.getsizeof(value) >= threshold:  # deep for some (pandas)
        return True
    attributes = getattr(value, "__dict__", None)
    if depth and type(attributes) is dict:  # an object holding a large value
        return any(maybe_large(item, threshold, depth - 1) for item in attributes.values())
    return False


def snapshot_each(values: Sequence[Any], memo: Optional[Memo]) -> List[Any]:
    """Each of ``values`` as it is now (a call's positional arguments, say)."""
    return [snapshot(value, memo) for value in values]


def _take(value: Any, kind: type, memo: Optional[Memo]) -> Any:
    if kind is tuple or kind is frozenset:
        if all(type(item) in _UNCHANGING for item in value):
            return value
    elif kind is list or kind is set:
        if all(type(item) in _UNCHANGING for item in value):
            return kind(value)
    elif kind is dict:
        if all(type(item) in _UNCHANGING for item in value.values()):
            return dict(value)
    if _holds_future(value):
        return _rebuild(value, memo)
    sharing = memo.sharing if memo is not None else None
    try:
        if sharing is None:
            return Frozen(cloudpickle.dumps(value, _PROTOCOL))
        return _shared_or_frozen(value, sharing, memo)
    except Exception:
        return value  # sent as it is: the runner reports the pickling error then


def _shared_or_frozen(value: Any, sharing: SharedValues, memo: Optional[Memo]) -> Any:
    """``value`` frozen, its large parts shared: itself if it is large, else the large
    items of a large list, tuple or dict (a new one may hold the same item each call),
    else the large arrays inside it."""
    buffers: List[pickle.PickleBuffer] = []
    file = io.BytesIO()
    pickler = _SharingPickler(file, sharing, value, buffers.append, memo)
    pickler.dump(value)
    data = file.getvalue()
    if not pickler.shared and len(data) + sum(b.raw().nbytes for b in buffers) >= sharing.threshold:
        kind = type(value)
        if kind is list or kind is tuple:
            items = [snapshot(item, memo) for item in value]
            if any(map(_holds_shared, items)):
                return kind(items)
        elif kind is dict:
            items = [snapshot(item, memo) for item in value.values()]
            if any(map(_holds_shared, items)):
                return dict(zip(value, items))
        shared = sharing.share(value, data, buffers)
        if shared is not None:
            return shared
    if not pickler.shared:
        # Small after all: as without sharing (its buffers in band, writable arrays).
        return Frozen(cloudpickle.dumps(value, _PROTOCOL) if buffers else data)
    return Frozen(data, tuple(pickler.shared), tuple(b.raw().tobytes() for b in buffers))


def _holds_shared(taken: Any) -> bool:
    """Whether a snapshot is, or is a list, tuple or dict holding, a shared value."""
    kind = type(taken)
    if kind is Shared:
        return True
    if kind is list or kind is tuple:
        return any(map(_holds_shared, taken))
    if kind is dict:
        return any(map(_holds_shared, taken.values()))
    return False


def _holds_future(value: Any) -> bool:
    for _ in iter_leaves(value, lambda leaf: isinstance(leaf, PrefectFuture)):
        return True
    return False


def _rebuild(value: Any, memo: Optional[Memo]) -> Any:
    """A collection holding futures, rebuilt around them with its other values snapshot."""
    if isinstance(value, dict):
        items = [(key, snapshot(item, memo)) for key, item in value.items()]
        try:
            return type(value)(items)
        except TypeError:
            return dict(items)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [snapshot(item, memo) for item in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*items)
        try:
            return type(value)(items)
        except TypeError:
            return next(b for b in (list, tuple, set, frozenset) if isinstance(value, b))(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        copied = copy.copy(value)
        for field in dataclasses.fields(value):
            object.__setattr__(copied, field.name, snapshot(getattr(value, field.name), memo))
        return copied
    return value
