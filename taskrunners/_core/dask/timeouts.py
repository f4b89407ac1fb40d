"""The client side of the DaskTaskRunner's time limits: a call a worker reports stuck.

A worker interrupts a call past its limit in its thread and, if the call is still
running a moment later, reports it (see :mod:`~taskrunners._core.dask.expiry`). Here,
on the client's event loop, that report settles the call at once as TimedOut, and
what it was sent with:

- the calls of its batch that finished before it get the States the report brought;
  those after it, which will not start on that worker any more, go back to the
  dispatcher and run elsewhere; the batch's Dask task is then left alone;
- on a cluster the runner created with worker processes, its Dask task is cancelled
  and then its worker restarted (through its nanny), so the work stops; as the task
  is cancelled first, Dask does not run it again elsewhere;
- on any other cluster (``address``, or workers in this process) no worker is ever
  restarted: a warning says the work may still be running there, and the worker
  thread stays taken until the call returns.

Only Dask tasks of calls with a limit are registered (once per task, by the token of
its first call, in one table for the process, as the event reaches every subscribed
client); calls without a limit cost nothing here.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

from taskrunners._core.dask.calls import DaskBatch, DaskCall
from taskrunners._core.dask.expiry import TOPIC
from taskrunners._core.limits import timed_out_state
from taskrunners._core.remote.protocol import decode_batch

__all__ = ["TimeoutPolicy", "Expiring", "forget"]

# The calls with a limit in flight, by token: their Dask task and place in it.
_expiring: Dict[str, "Expiring"] = {}
_subscribed: "weakref.WeakSet[Any]" = weakref.WeakSet()
_subscribe_lock = threading.Lock()
_RESTART_TIMEOUT_SECONDS = 60.0


class TimeoutPolicy:
    """What one ``start()`` block does with its calls reported stuck past their limit.

    :param client: the block's client
    :param restarts: whether the runner created the cluster and its workers are
        processes with a nanny: a stuck call's worker is then restarted
    :param batches: the block's ``DaskBatches`` (None with ``batch_size=1``)
    :param tokens: the submitter's key -> token map of Dask tasks in flight
    """

    def __init__(
        self,
        client: Any,
        restarts: bool,
        batches: Any,
        tokens: Dict[str, str],
        logger: logging.Logger,
    ) -> None:
        self.client = client
        self.restarts = restarts
        self.batches = batches
        self.tokens = tokens
        self.logger = logger
        self._restarting: List[threading.Thread] = []
        self._lock = threading.Lock()
        with _subscribe_lock:
            if client not in _subscribed:
                client.subscribe_topic(TOPIC, _on_event)
                _subscribed.add(client)

    def register(
        self,
        calls: List[DaskCall],
        task: str,
        name: Optional[str],
        seconds: float,
        sent: Optional[DaskBatch],
        dask_future: Any,
        entries: Optional[List[Any]] = None,
    ) -> None:
        """Calls with a limit of ``seconds`` just handed to Dask as one Dask task, which
        its workers name by ``task`` (the token of its first call).

        :param name: the task run's name, for a call alone
        :param sent: the dispatcher's batch they went as, if they did (it forgets
            them when settled, see :func:`forget`); else the call does
        :param entries: the dispatcher's entries of a batch of several (to resend)
        """
        _expiring[task] = Expiring(self, calls, name, seconds, sent, dask_future, entries)
        if sent is None:
            calls[0].add_done_callback(functools.partial(_forget_call, task))

    def stop(self, dask_future: Any, message: Dict[str, Any], name: str) -> None:
        """Stop the work of a stuck call: restart its worker, or warn that it runs on."""
        worker = message.get("worker")
        if not self.restarts:
            self.logger.warning(
                "Task run %r ran past its time limit on the Dask worker %s and is blocked "
                "where it cannot be interrupted: the runner did not start that worker (or "
                "it runs in this process), so it is not restarted, and the work may still "
                "be running there.",
                name,
                worker,
            )
            return
        thread = threading.Thread(
            target=self._restart,
            args=(dask_future, worker, name),
            name="taskrunners-dask-restart",
            daemon=True,
        )
        thread.start()
        with self._lock:
            self._restarting = [other for other in self._restarting if other.is_alive()]
            self._restarting.append(thread)

    def _restart(self, dask_future: Any, worker: str, name: str) -> None:
        client = self.client
        try:
            # Dask would run again, elsewhere, the task it loses with the worker and the
            # finished ones whose results only that worker holds: those are let go
            # first (a call taking such a result then takes its State by value).
            lost = [dask_future, *_held_only_by(client, worker)]
            client.cancel(lost)
            _wait_released(client, [future.key for future in lost])
            answer = client.restart_workers(
                [worker], timeout=_RESTART_TIMEOUT_SECONDS, raise_for_error=False
            )
        except Exception as exc:
            answer = {worker: repr(exc)}
        status = answer.get(worker) if isinstance(answer, dict) else answer
        if status != "OK":
            self.logger.warning(
                "Task run %r ran past its time limit and could not be stopped: restarting "
                "its Dask worker %s failed (%s); the work may still be running there.",
                name,
                worker,
                status,
            )
        else:
            self.logger.debug("Restarted the Dask worker %s, which ran task run %r past its limit", worker, name)

    def close(self, timeout: float = _RESTART_TIMEOUT_SECONDS) -> None:
        """The block ends: wait for the worker restarts under way."""
        with self._lock:
            restarting, self._restarting = self._restarting, []
        for thread in restarting:
            thread.join(timeout)


class Expiring:
    """One Dask task holding calls with a limit: a call alone, or a batch."""

    __slots__ = ("policy", "calls", "name", "seconds", "sent", "dask_future", "entries")

    def __init__(
        self,
        policy: TimeoutPolicy,
        calls: List[DaskCall],
        name: Optional[str],
        seconds: float,
        sent: Optional[DaskBatch],
        dask_future: Any,
        entries: Optional[List[Any]],
    ) -> None:
        self.policy = policy
        self.calls = calls
        self.name = name
        self.seconds = seconds
        self.sent = sent
        self.dask_future = dask_future
        self.entries = entries

    def expired(self, position: int, message: Dict[str, Any]) -> None:
        """A worker reports the call at ``position`` stuck past its limit (client loop)."""
        calls, entries = self.calls, self.entries
        if position >= len(calls) or calls[position].done():
            return
        call = calls[position]
        name = self.name if entries is None else entries[position].item.task_run.name
        policy = self.policy
        if entries is not None:
            self._settle_batch(position, message.get("done"))
        elif self.sent is not None and policy.batches is not None:
            policy.batches.abandoned(self.sent)
        if call.key is not None and policy.tokens.get(call.key) == call.token:
            policy.tokens.pop(call.key, None)
        # Warned (or the restart under way) before anybody sees the State.
        policy.stop(self.dask_future, message, str(name))
        call.set_result(timed_out_state(str(name), self.seconds))

    def _settle_batch(self, position: int, done: Optional[bytes]) -> None:
        """The calls before the stuck one get their States, those after go again."""
        batches = self.policy.batches
        if done is not None:
            outcomes, _ = decode_batch([call.key or "?" for call in self.calls[:position]], done)
            for call, (state, _) in zip(self.calls, outcomes):
                call.dask_future = None
                call.set_result(state)
        if self.sent is not None:
            batches.abandoned(self.sent)
        for entry in (self.entries or ())[position + 1 :]:
            call = entry.call
            with call.handover:
                if call.cancelling or call.done():
                    continue
                call.dask_future = call.token = call.position = None
            batches.dispatcher.submit(entry)


def _held_only_by(client: Any, worker: str) -> List[Any]:
    """Futures of ``client`` for the results that only ``worker`` holds."""
    import distributed

    wanted = getattr(client, "futures", {})
    return [
        distributed.Future(key, client)
        for key, holders in client.who_has().items()
        if list(holders) == [worker] and key in wanted
    ]


def _wait_released(client: Any, keys: List[Any], patience: float = 5.0) -> None:
    """Wait until the scheduler let ``keys`` go (a cancellation is not acknowledged)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if not client.run_on_scheduler(_known_keys, keys):
            return
        time.sleep(0.02)


def _known_keys(keys: List[Any], dask_scheduler: Any = None) -> List[Any]:
    """Run on the scheduler: which of ``keys`` it still has a task for."""
    return [key for key in keys if key in dask_scheduler.tasks]


def forget(task: Optional[str]) -> None:
    """The Dask task ``task`` (see :meth:`TimeoutPolicy.register`) is settled."""
    if task is not None:
        _expiring.pop(task, None)


def _forget_call(task: str, call: Any) -> None:
    _expiring.pop(task, None)


def _on_event(event: Any) -> None:
    """A worker's report of a stuck call (on the client's loop): see :class:`Expiring`."""
    try:
        message = event[1]
        expiring = _expiring.pop(message["task"], None)
        position = int(message["position"])
    except Exception:
        return
    if expiring is not None:
        expiring.expired(position, message)
