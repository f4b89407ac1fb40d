"""The worker side of the DaskTaskRunner's time limits: what stops a call past its limit.

When a call's limit passes (the clock started when the call started on the worker),
an exception is raised into the worker thread running it (``ThreadGuard.interrupt``),
which stops a busy Python loop at once. A call blocked in C (a sleep, a socket read)
sees it only when that returns: if it is still running :data:`GRACE_SECONDS` later,
the worker tells the client by a Dask event on :data:`TOPIC` (``Worker.log_event``),
naming the call by its Dask task's first token and its place there, with the States
of the calls of its batch that had finished (the calls after it will not start here
any more). Its thread then leaves the worker's thread pool (as ``distributed.secede()``
would from inside), so that the worker runs other tasks meanwhile and does not wait
for it when it closes. The client's half is in :mod:`~taskrunners._core.dask.timeouts`.
An event leaves on the worker's stream to the scheduler before the task's own end,
so the client hears of the stuck call before it could hear of its batch ending.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

from taskrunners._core.dask import dask_private
from taskrunners._core.limits import ThreadGuard, watchdog
from taskrunners._core.remote.protocol import Expire

__all__ = ["TOPIC", "GRACE_SECONDS", "current_worker", "expiry", "run_name"]

#: The Dask event topic of calls stuck past their limit.
TOPIC = "taskrunners-timeouts"
#: How long a call interrupted at its limit has to end before the client is told.
GRACE_SECONDS = 0.4

#: What a stuck call's check gives: None if the call has ended meanwhile, else a
#: tuple of the pickled outcomes of the calls of its batch that finished (or None).
Freeze = Callable[[], Optional[Tuple[Optional[bytes]]]]


def current_worker() -> Any:
    """The Dask worker running this task (in a task's thread), or None."""
    try:
        import distributed

        return distributed.get_worker()
    except Exception:
        return None


def expiry(task: str, position: int, freeze: Freeze, worker: Any) -> Expire:
    """What stops the call at ``position`` in the Dask task ``task`` (the token of its
    first call) once its limit passes: an exception raised into
    its thread, then, if it still runs :data:`GRACE_SECONDS` later, an event telling
    the client (``freeze`` checks, under the registry's lock, that it still runs and
    keeps the rest of its batch from starting here)."""

    def report(ident: int) -> None:
        frozen = freeze()
        if frozen is None or worker is None:
            return
        # Its thread leaves the worker's pool: the worker runs other tasks meanwhile.
        dask_private.secede_thread(worker, ident)
        message = {"task": task, "position": position, "worker": worker.address, "pid": os.getpid(), "done": frozen[0]}
        worker.log_event(TOPIC, message)

    def expire(guard: ThreadGuard) -> None:
        guard.interrupt()
        watchdog().arm(GRACE_SECONDS, lambda: report(guard.ident))

    return expire


def run_name(key: str) -> str:
    """The task run's name in a call's key (``f"{name}-{id.hex}"``, maybe ``-rerun``)."""
    if key.endswith("-rerun"):
        key = key[: -len("-rerun")]
    name, _, tail = key.rpartition("-")
    if name and len(tail) == 32:
        return name
    return key
