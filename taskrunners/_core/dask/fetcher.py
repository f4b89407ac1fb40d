"""The DaskTaskRunner's manager: it fetches the States of finished calls, on the Dask
client's event loop.

Dask runs every done callback on the client's loop, so the manager is not a thread of
ours but a coroutine there: done calls queue up, and one ``gather`` brings back every
State that finished meanwhile, so many small calls cost a few round trips.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from typing import Any, Callable, List, Tuple, Union

from taskrunners._core.dask import dask_private
from taskrunners._core.dask.calls import CLIENT_CLOSED, DaskBatch, DaskCall
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["StateFetcher", "Watched"]

#: What the fetcher watches: a call, or a batch the dispatcher sent.
Watched = Union[DaskCall, DaskBatch]


class StateFetcher:
    """Fetches the States of finished calls in batches, on the client's event loop.

    :param on_outcome: called with a call and what its Dask task returned
    :param on_failure: called with a call and what its Dask task raised

    A :class:`DaskBatch` is settled by its ``sender`` instead (its ``settle``,
    ``fail`` and ``abandoned``).
    """

    def __init__(
        self,
        client: Any,
        on_outcome: Callable[[DaskCall, Any], None],
        on_failure: Callable[[DaskCall, BaseException], None],
    ) -> None:
        self._client = client
        self._on_outcome = on_outcome
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._to_watch: List[Tuple[Watched, Any]] = []
        self._watching = False
        self._ready: List[Tuple[Watched, Any]] = []
        self._fetching = False

    def watch(self, call: Watched, dask_future: Any) -> None:
        """Fetch the State of ``call`` (or batch) once ``dask_future`` is done."""
        # Done callbacks are registered from the client's loop, a burst at a time:
        # each registration from another thread would wake the loop up.
        with self._lock:
            self._to_watch.append((call, dask_future))
            if self._watching:
                return
            self._watching = True
        dask_private.call_soon_on_client_loop(self._client, self._watch_all)

    def _watch_all(self) -> None:
        with self._lock:
            batch, self._to_watch, self._watching = self._to_watch, [], False
        for call, dask_future in batch:
            dask_future.add_done_callback(functools.partial(self._on_done, call))

    def _on_done(self, call: Watched, dask_future: Any) -> None:
        with self._lock:
            self._ready.append((call, dask_future))
            if self._fetching:
                return
            self._fetching = True
        try:
            dask_private.call_soon_on_client_loop(self._client, self._fetch)
        except Exception:  # the client's loop is gone: nothing can be fetched
            with self._lock:
                batch, self._ready, self._fetching = self._ready, [], False
            for call, _ in batch:
                self._abandon(call, Crashed(message=CLIENT_CLOSED))

    async def _fetch(self) -> None:
        while True:
            with self._lock:
                batch, self._ready = self._ready, []
                if not batch:
                    self._fetching = False
                    return
            try:
                await self._settle(batch)
            except BaseException as exc:
                for call, _ in batch:
                    self._abandon(call, exception_to_crashed_state(exc))
                if not isinstance(exc, Exception):
                    with self._lock:
                        self._fetching = False
                    raise

    def _abandon(self, watched: Watched, state: State) -> None:
        if not isinstance(watched, DaskBatch):
            watched.set_result(state)
            return
        if watched.settled:
            return
        for call in watched.calls:
            call.set_result(state)
        watched.sender.abandoned(watched)

    def _outcome(self, watched: Watched, value: Any) -> None:
        if isinstance(watched, DaskBatch):
            watched.sender.settle(watched, value)
        else:
            self._on_outcome(watched, value)

    def _failure(self, watched: Watched, exc: BaseException) -> None:
        if isinstance(watched, DaskBatch):
            watched.sender.fail(watched, exc)
        else:
            self._on_failure(watched, exc)

    async def _settle(self, batch: List[Tuple[Watched, Any]]) -> None:
        gatherable: List[Watched] = []
        for call, dask_future in batch:
            if call.done() or call.dask_future is not dask_future:
                continue  # cancelled, or replaced by a rerun
            status = dask_future.status
            if status == "error":
                self._failure(call, await dask_future.exception(asynchronous=True))
            elif status == "cancelled":
                self._failure(call, concurrent.futures.CancelledError())
            else:
                gatherable.append(call)
        if not gatherable:
            return
        client = self._client
        try:
            values = await client.gather([c.dask_future for c in gatherable], asynchronous=True)
        except Exception:
            # One lost result must not take the others with it.
            for call in gatherable:
                try:
                    (value,) = await client.gather([call.dask_future], asynchronous=True)
                except Exception as exc:
                    value = Crashed(
                        message="The call's State could not be fetched from the Dask "
                        f"cluster: {exc!r}.",
                        data=exc,
                    )
                self._outcome(call, value)
            return
        for call, value in zip(gatherable, values):
            self._outcome(call, value)
