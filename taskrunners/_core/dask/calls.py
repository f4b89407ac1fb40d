"""The DaskTaskRunner's calls as the client sees them: their handle, and cancelling them
through the workers' registry (their States are fetched by
:mod:`~taskrunners._core.dask.fetcher`).

Hazards, each with its own answer:

- Started or not. Dask cannot stop a task a worker has begun, nor tell the client
  whether it has. The workers are asked (their registry is in
  :mod:`~taskrunners._core.dask.worker`), once for any number of calls, and only
  the calls that no worker started are cancelled: a cancelled call never runs, a
  started call runs to its end, as in ``concurrent.futures``.
- The client's own loop. States are fetched and Dask's callbacks run on the client's
  event loop thread. A handle used there must not block it, so there the workers
  are never asked: only a call not yet handed to Dask can be cancelled, and a call
  counts as running only once a worker was seen running it.
- Many small calls. One ``gather`` brings back every State that finished meanwhile,
  so a thousand small calls cost a few round trips, not a thousand.
- Batches. The calls of a :class:`DaskBatch` share one Dask future, which holds
  their States together: it is never handed to a downstream call, and cancelling
  one call never cancels it (the workers' registry keeps that call from starting).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from taskrunners._core.batching import Dispatcher
from taskrunners._core.calls import CANCELLED, CANCELLING, PENDING, RUNNING, Call
from taskrunners._core.dask import dask_private, worker as dask_worker
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = [
    "CLIENT_CLOSED",
    "DaskCall",
    "DaskBatch",
    "Submission",
    "dask_future_to_hand_off",
    "handed_off",
    "forget_token",
    "failure_state",
    "unpicklable_call_state",
    "cancel_unstarted",
    "abort_calls",
]

CLIENT_CLOSED = "The Dask client closed before the call's State arrived."


class DaskCall(Call):
    """One call on the cluster; its State arrives from the client's loop.

    ``dask_future``, ``key`` and ``token`` are None until the call is handed to Dask
    (it may wait for upstream calls, or in the runner's dispatcher for a batch); all
    are replaced if the call is rerun. It counts as running once a worker reported
    that it started.
    """

    __slots__ = (
        "client", "dispatcher", "canceller", "key", "token", "dask_future", "handover", "rerun",
        "waiting_on", "shared", "position",
    )

    def __init__(
        self,
        client: Any,
        dispatcher: Optional[Dispatcher[Any]],
        canceller: Callable[[List["DaskCall"]], None],
    ) -> None:
        super().__init__()
        self.client = client
        #: The dispatcher of the block's batches, which may gather the call; None
        #: with ``batch_size=1``.
        self.dispatcher = dispatcher
        #: Cancels the calls it is given that no worker has started.
        self.canceller = canceller
        self.key: Optional[str] = None
        self.token: Optional[str] = None
        self.dask_future: Any = None
        # Held while the call is handed to Dask, and while it is held back from Dask
        # (:meth:`hold_back`): a cancelled call is never handed over.
        self.handover = threading.Lock()
        # Set when upstream calls were handed to Dask: what a rerun needs.
        self.rerun: Optional[Tuple[Any, ...]] = None
        # The upstream calls it waits for before it is handed to Dask.
        self.waiting_on: Optional[List[Any]] = None
        # The large values its task takes (``dask.scattered``): kept until it is done.
        self.shared: Optional[List[Any]] = None
        # Its place in its batch's outcomes, when it is in one.
        self.position: Optional[int] = None

    def _ended(self) -> None:
        self.shared = None

    def expedite(self) -> None:
        """Somebody waits for the call: send it now if the dispatcher gathers it, and
        the upstream calls it waits for likewise."""
        if self._state is not None:
            return
        if self.dispatcher is not None:
            self.dispatcher.expedite(self)
        for upstream in self.waiting_on or ():
            upstream.expedite()

    @property
    def started(self) -> bool:
        """Whether a worker was seen running the call, and it is not done."""
        return self._phase is RUNNING

    @property
    def cancelling(self) -> bool:
        """Whether the call is held back from Dask (see :meth:`hold_back`), or cancelled."""
        return bool(self._phase & (CANCELLING | CANCELLED))

    @property
    def in_batch(self) -> bool:
        """Whether ``dask_future`` is a batch's (its key is the batch's, not the call's)."""
        dask_future = self.dask_future
        return dask_future is not None and dask_future.key != self.key

    def hold_back(self, started_too: bool = False) -> None:
        """Under ``handover``: the call is not handed to Dask (again), as its cancellation
        follows outside that lock; a started call is held back only if ``started_too``."""
        self._move(PENDING | RUNNING if started_too else PENDING, CANCELLING)

    def running(self) -> bool:
        """Whether the call has started on a worker and is not done (asks the workers).

        On the Dask client's event loop thread, where the workers cannot be asked
        without blocking that loop, it is False until a worker was seen running it.
        """
        if self.done():
            return False
        return self._phase is RUNNING or _started_on_workers(self)

    def cancel(self) -> bool:
        """Cancel the call if no worker has started it; a started call runs to its end.

        On the Dask client's event loop thread only a call not yet handed to Dask can
        be cancelled (asking the workers would block that loop); False otherwise.
        """
        if not self.done():
            self.canceller([self])
        return self.cancelled()


def forget_token(tokens: Dict[str, str], call: DaskCall) -> None:
    """Drop the call's key from ``tokens`` (key -> token of the Dask task in flight)."""
    if call.key is not None and tokens.get(call.key) == call.token:
        tokens.pop(call.key, None)


class Submission(NamedTuple):
    """What a call was submitted with: what starting it (again) needs."""

    task_run: Any
    run_fn: Callable[..., Any]
    run_kwargs: Dict[str, Any]
    #: ``dask.annotate`` values to start it with, if not started at once.
    annotations: Optional[Dict[str, Any]] = None


class DaskBatch:
    """What one Dask task the dispatcher sent carries: a batch of calls, or one call.

    :param calls: its calls, in the order they run
    :param task: the task they belong to (what their durations are recorded under)
    :param sender: what sent it, and settles it (the runner's ``DaskBatches``)
    :param single: whether it is one call sent as it would be alone (its own key,
        :func:`~taskrunners._core.dask.worker.run_task`), rather than a batch
    """

    __slots__ = ("calls", "task", "sender", "single", "dask_future", "settled", "expiring")

    def __init__(self, calls: List[DaskCall], task: Any, sender: Any, single: bool) -> None:
        self.calls = calls
        self.task = task
        self.sender = sender
        self.single = single
        self.dask_future: Any = None
        self.settled = False
        #: Its key in ``dask.timeouts`` if its calls have a time limit, else None.
        self.expiring: Optional[str] = None

    def done(self) -> bool:
        """Whether its outcome was handled (the fetcher then leaves it alone)."""
        return self.settled


def dask_future_to_hand_off(call: Any, client: Any) -> Any:
    """The Dask future a downstream call can be handed for ``call``, or None.

    A call that failed in Dask and is settled goes by value; one not settled yet is
    handed off anyway, and its downstream call is rerun if Dask fails it. A call in
    a batch goes by value: its Dask future holds the whole batch's States.
    """
    if type(call) is not DaskCall or call.client is not client or call.in_batch:
        return None
    dask_future = call.dask_future
    if dask_future is None:
        return None
    if call.done() and dask_future.status in ("error", "cancelled"):
        return None
    return dask_future


def handed_off(call: Any, client: Any) -> Any:
    """A done upstream call's State left where Dask holds it, for a call that takes it
    (a :class:`~taskrunners._core.dask.worker.HandedOff`), or None if Dask holds none."""
    if type(call) is not DaskCall or call.client is not client:
        return None
    dask_future = call.dask_future
    if dask_future is None or dask_future.status in ("error", "cancelled"):
        return None
    return dask_worker.HandedOff(dask_future, call.position if call.in_batch else None)


def unpicklable_call_state(exc: BaseException) -> State:
    """The State of a call whose function or arguments ``cloudpickle`` refused."""
    return Crashed(
        message=f"The call's function or arguments could not be pickled: {exc!r}.", data=exc
    )


def failure_state(exc: BaseException, in_batch: bool) -> State:
    """The State of a call whose Dask task (its own, or its batch's) raised ``exc``."""
    import distributed

    if isinstance(exc, (concurrent.futures.CancelledError, asyncio.CancelledError)):
        return exception_to_crashed_state(exc)
    if isinstance(exc, distributed.KilledWorker):
        what = "this call's batch" if in_batch else "this call"
        again = (
            "; Dask runs a lost batch again whole, so its calls may have run more than once"
            if in_batch
            else ""
        )
        return Crashed(
            message=f"The Dask worker running {what} died (killed, out of memory or "
            "exited) on every attempt Dask made (see the scheduler's "
            f"`distributed.scheduler.allowed-failures`){again}: {exc}",
            data=exc,
        )
    what = "the call's batch or return its States" if in_batch else "the call or return its State"
    return Crashed(message=f"Dask could not run {what}: {exc!r}", data=exc)


def _on_loop_of(client: Any) -> bool:
    """Whether this thread runs ``client``'s event loop (where it must not block)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is dask_private.client_event_loop(client)


# -- cancelling ----------------------------------------------------------------------------


def cancel_unstarted(calls: Iterable[Any], tokens: Dict[str, str], logger: logging.Logger) -> None:
    """Cancel each of ``calls`` that no worker has started, asking the workers once.

    A call that has started runs to its end, as in ``concurrent.futures``. On the
    Dask client's event loop thread only calls not yet handed to Dask are cancelled:
    asking the workers from there would block the loop that answers. ``tokens`` is
    the runner's key -> token map, from which cancelled calls go.
    """
    to_ask: Dict[Any, List[Tuple[DaskCall, Any, str]]] = {}
    for call in calls:
        if type(call) is not DaskCall or call.done() or call.started:
            continue
        with call.handover:
            dask_future, token = call.dask_future, call.token
            if dask_future is None:
                # Waiting for upstream calls of another runner, or to be rerun:
                # from now on it will not be handed to Dask.
                call.hold_back()
        if dask_future is None:
            Call.cancel(call)
        elif dask_future.status != "finished":  # finished: it ran, its State is coming
            to_ask.setdefault(call.client, []).append((call, dask_future, str(token)))
    for client, entries in to_ask.items():
        if not _on_loop_of(client):
            _cancel_on_workers(client, entries, tokens, logger)


def _cancel_on_workers(
    client: Any,
    entries: List[Tuple[DaskCall, Any, str]],
    tokens: Dict[str, str],
    logger: logging.Logger,
) -> None:
    try:
        answers = client.run(
            dask_worker.cancel_unstarted_calls,
            [token for _, _, token in entries],
            on_error="ignore",
        )
    except Exception:
        logger.debug("Asking the Dask workers which calls started failed", exc_info=True)
        return
    started = set(itertools.chain.from_iterable(answers.values()))
    cancelled = []
    for call, dask_future, token in entries:
        if token in started:
            call.set_running()
            continue
        with call.handover:
            # Rerun meanwhile (Dask failed it for a failed upstream, unstarted): not
            # cancelled if its new task is submitted already, as that may have started.
            if call.dask_future is not dask_future and call.dask_future is not None:
                continue
            call.hold_back()
        if Call.cancel(call):
            # A batch's Dask task runs on (its worker skips this call); the call's own goes.
            if dask_future.key == call.key:
                cancelled.append(dask_future)
            forget_token(tokens, call)
    if started:
        # The workers that had not started a started call marked it cancelled: a
        # retry of it (Dask's ``retries``, or a rerun after its worker died) must
        # still be able to start there. No answer is needed.
        dask_private.call_soon_on_client_loop(
            client,
            client.run,
            dask_worker.forget_cancellations,
            sorted(started),
            on_error="ignore",
            asynchronous=True,
        )
    if cancelled:
        # Waited for: until the scheduler has released them, a task run submitted
        # again under the same key would be given the cancelled task.
        try:
            client.cancel(cancelled)
        except Exception:
            logger.debug("Cancelling the Dask futures failed", exc_info=True)


def abort_calls(client: Any, calls: List[DaskCall], tell_workers: bool, logger: logging.Logger) -> None:
    """The block is left with an exception: cancel every one of ``calls`` that is not
    done, whether it started or not, and its Dask task (a batch's once).

    :param tell_workers: whether to have the workers cancel them too (coroutine calls
        running there are cancelled where they await, the others do not start)
    """
    tokens: List[str] = []
    dask_futures: Dict[int, Any] = {}
    for call in calls:
        with call.handover:
            call.hold_back(started_too=True)
            if call.dask_future is not None and not call.done():
                tokens.append(str(call.token))
                dask_futures[id(call.dask_future)] = call.dask_future
        # The Dask futures are cancelled below, all at once.
        call.set_cancelled()
    if not tokens or client is None or not dask_private.client_is_open(client):
        return
    if tell_workers:
        try:
            client.run(dask_worker.abort_calls, tokens)
        except Exception:
            logger.debug("Cancelling calls on the workers failed", exc_info=True)
    try:
        client.cancel(list(dask_futures.values()))
    except Exception:
        logger.debug("Cancelling the Dask futures failed", exc_info=True)


def _started_on_workers(call: DaskCall) -> bool:
    with call.handover:
        dask_future, token = call.dask_future, call.token
    if dask_future is None or _on_loop_of(call.client):
        return False
    if dask_future.status == "finished":
        started = True
    else:
        try:
            answers = call.client.run(dask_worker.started_calls, [token], on_error="ignore")
        except Exception:
            return False
        started = any(answers.values())
    if started:
        call.set_running()
    return started and not call.done()
