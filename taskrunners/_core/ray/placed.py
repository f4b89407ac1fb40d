"""The Ray runner's large values: put in the object store once, handed to tasks as refs.

Each value shared by the calls of a block (see :mod:`~taskrunners._core.remote.sharing`)
is put once, as its pickle and buffers. While the block holds any, the sender pickles
each call it sends itself (:func:`pickled_call`), noting the values it takes; their
refs go with the task as arguments of their own, so Ray gives the worker each payload
from its node's store, zero-copy, and the worker loads the value once (read-only
buffers: a numpy array is a read-only view of the store) for every call that takes
it. When no pending call needs the value its ref is dropped, which frees the object.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cloudpickle

from taskrunners._core.remote.sharing import (
    Copy,
    Payload,
    Shared,
    SharedValues,
    collect,
    collecting,
    load_placed,
    placed,
)

__all__ = ["PutValues", "PickledCall", "pickled_call", "unpickled_call"]


class PutValues(SharedValues):
    """Large values put in Ray's object store, one object each: the store's is the
    block's only copy of each."""

    def __init__(self, threshold: int, ray: Any) -> None:
        super().__init__(threshold)
        self._ray = ray

    def _copy(self, key: str, header: bytes, raw: List[memoryview]) -> Copy:
        reference = self._ray.put(Payload(header, raw))
        return _Stored(reference, self._ray.get(reference))

    def _place(self, shared: Shared) -> bool:
        copy = self._copy_of(shared)
        assert isinstance(copy, _Stored)  # as _copy made it
        shared.reference = copy.reference
        return True

    def reduce(self, shared: Shared) -> Tuple[Any, ...]:
        if shared.reference is not None and collect(shared):
            return (load_placed, (shared.key,))
        return super().reduce(shared)  # not on its way to a task: the value itself


class _Stored(Copy):
    """A value's pickle and buffers in Ray's object store, read here in place (for a
    driver on the store's node: zero-copy views)."""

    __slots__ = ("reference", "payload")

    def __init__(self, reference: Any, payload: Payload) -> None:
        self.reference = reference
        self.payload = payload

    @property
    def header(self) -> memoryview:
        return memoryview(self.payload.header)

    def buffers(self) -> List[memoryview]:
        return [memoryview(buffer) for buffer in self.payload.buffers]


class PickledCall:
    """A call's ``(run_fn or None, run_kwargs)`` pickled by the sender, and where the
    payload of each large value it takes is among its task's arguments."""

    __slots__ = ("data", "places")

    def __init__(self, data: bytes, places: List[Tuple[str, int]]) -> None:
        self.data = data
        self.places = places

    def __reduce__(self) -> Tuple[Any, ...]:
        return (PickledCall, (self.data, self.places))


def pickled_call(
    run_fn: Optional[Callable[..., Any]], run_kwargs: Any, index_of: Callable[[Any], int]
) -> PickledCall:
    """The call pickled; ``index_of(ref)`` gives each large value's ref its argument."""
    with collecting() as collected:
        data = cloudpickle.dumps((run_fn, run_kwargs))
    return PickledCall(data, [(shared.key, index_of(shared.reference)) for shared in collected])


def unpickled_call(call: PickledCall, arguments: Sequence[Any]) -> Tuple[Any, Dict[str, Any]]:
    """In a worker: ``(run_fn or None, run_kwargs)``, each large value in place."""
    payloads: Dict[str, Tuple[Any, Optional[Callable[[], bool]]]] = {
        key: (arguments[index], None) for key, index in call.places
    }
    with placed(payloads):
        run_fn, run_kwargs = cloudpickle.loads(call.data)
    return run_fn, run_kwargs
