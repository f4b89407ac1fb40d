"""The Dask runner's large values: scattered to the cluster once, handed to tasks by key.

Each value shared by the calls of a block (see :mod:`~taskrunners._core.remote.sharing`)
is scattered once, as its pickle and buffers; a call that takes it depends on the
scattered key, so Dask moves it to each worker that runs such a call, once, and the
worker loads it once (read-only buffers) for all of them. The graph holds a key, not
the value: Dask's warning about large graphs has nothing to warn about. When no
pending call needs the value its Dask future is dropped, which releases the key.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

from taskrunners._core.remote.sharing import (
    Shared,
    SharedValues,
    collect,
    load_placed,
)

__all__ = ["ScatteredValues", "dependencies", "payloads_here"]


class ScatteredValues(SharedValues):
    """Large values scattered with ``client``, one Dask key each."""

    def __init__(self, threshold: int, client: Any) -> None:
        super().__init__(threshold)
        self._client = client

    def _place(self, shared: Shared) -> bool:
        if _on_loop(self._client):  # a call started by a callback: scatter would wait on itself
            return False
        shared.reference = self._client.scatter(self.payload(shared), hash=False)
        return True

    def reduce(self, shared: Shared) -> Tuple[Any, ...]:
        if shared.reference is not None and collect(shared):
            return (load_placed, (shared.key,))
        return super().reduce(shared)  # not on its way to a task: the value itself


def _on_loop(client: Any) -> bool:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is getattr(client.loop, "asyncio_loop", None)


def dependencies(collected: List[Shared]) -> Optional[List[Tuple[str, str, Any]]]:
    """What a task that took the ``collected`` values is given, to depend on them:
    (key, Dask key, Dask future) each; Dask puts the payloads in place of the futures."""
    if not collected:
        return None
    return [(shared.key, shared.reference.key, shared.reference) for shared in collected]


def payloads_here(
    shared: Optional[List[Tuple[str, str, Any]]],
) -> Optional[Dict[str, Tuple[Any, Optional[Callable[[], bool]]]]]:
    """In a worker: each shared key's payload, and whether this worker still holds it."""
    if not shared:
        return None
    import distributed

    try:
        data = distributed.get_worker().data
    except ValueError:  # not in a worker: kept until unused a while
        data = None
    return {
        key: (payload, None if data is None else functools.partial(data.__contains__, dask_key))
        for key, dask_key, payload in shared
    }
