"""What a Ray task's failure means for each call it carried: the Ray runner's Crashed states.

Ray reports failures per task, and a task may carry a batch of calls. For a task that
raised a Ray error, :func:`crash_state` names the cause for each of its calls. For a
batch whose worker died, Ray only says that the task's worker died; the runner's slot
table (:mod:`~taskrunners._core.remote.slots`) says which calls the worker had started and
finished, and :func:`after_worker_death` decides, call by call:

- the call that was running is Crashed, naming the cause, as a call alone would be;
- calls that had finished are Crashed saying that their result was lost with the
  worker: results travel back with the whole batch, and none reached this process;
- calls that had not started run again elsewhere;
- calls whose start nobody marked are Crashed saying so, and never run again. That is
  every call after the first of a batch whose worker ran on another machine, where the
  table cannot be opened: there only the first call is known to have started.

A call with a time limit that passes it ends its worker (see ``remote.slots``), which
marks it timed out and leaves the States of its batch's finished calls beside the
table (:func:`left_states`): the call is TimedOut, the finished calls get their
States, the others run again. A worker that could not open the table (another
machine) marks nothing: its call is Crashed, saying the worker ended, maybe at the
call's limit.

No call ever starts twice: only calls the table shows unstarted run again.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, List, Optional, Sequence, Tuple

from taskrunners._core.limits import timed_out_state
from taskrunners._core.ray import ray_private
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = [
    "crash_state",
    "unsubmittable_state",
    "is_worker_death",
    "is_unpickling_failure",
    "after_worker_death",
    "as_marks",
    "left_states",
    "maybe_timed_out_state",
]


def crash_state(name: str, exc: BaseException) -> State:
    """The Crashed state for call ``name`` whose Ray task ended in ``exc``, naming the cause."""
    exceptions = ray_private.import_ray().exceptions
    if isinstance(exc, exceptions.RayTaskError) and exc.cause is not None:
        # Raised in the worker outside run_fn, e.g. a result that cannot be pickled,
        # or (for a dependency) an upstream task that died.
        cause = exc.cause
        if isinstance(cause, exceptions.RayError):
            return crash_state(name, cause)
        return Crashed(
            message=f"The Ray task of call {name!r} failed outside run_fn: "
            f"{type(cause).__name__}: {cause}",
            data=cause,
        )
    if isinstance(exc, exceptions.TaskCancelledError):
        # The message of every cancelled call, with Ray's error as the data.
        cancelled = exception_to_crashed_state(concurrent.futures.CancelledError())
        return Crashed(message=cancelled.message, data=exc)
    if isinstance(exc, exceptions.OutOfMemoryError):
        return Crashed(
            message=f"Ray killed the worker running call {name!r} because the node ran "
            f"out of memory: {exc}",
            data=exc,
        )
    if isinstance(exc, exceptions.WorkerCrashedError):
        return Crashed(
            message=f"The Ray worker process running call {name!r} died mid-call (killed, "
            "or it exited); the call was not retried (max_retries=0). Ray: "
            f"{type(exc).__name__}: {exc}",
            data=exc,
        )
    if isinstance(exc, exceptions.RayError):
        return Crashed(
            message=f"Ray could not finish call {name!r}: {type(exc).__name__}: {exc}",
            data=exc,
        )
    return exception_to_crashed_state(exc)


def unsubmittable_state(name: str, exc: BaseException) -> State:
    """The Crashed state for call ``name`` that Ray refused to take (``.remote()`` raised)."""
    # Ray's serialization errors go on for pages: the first line says it.
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return Crashed(
        message=f"Ray could not submit the call {name!r}: {type(exc).__name__}: {first_line}",
        data=exc,
    )


def is_worker_death(exc: BaseException) -> bool:
    """Whether Ray says the worker running the task died (killed, exited, out of memory)."""
    exceptions = ray_private.import_ray().exceptions
    deaths = tuple(
        getattr(exceptions, name)
        for name in ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError")
        if hasattr(exceptions, name)
    )
    return isinstance(exc, deaths)


def is_unpickling_failure(exc: BaseException) -> bool:
    """Whether a task failed before its function ran: its arguments could not be unpickled."""
    exceptions = ray_private.import_ray().exceptions
    return isinstance(exc, exceptions.RayTaskError) and isinstance(
        exc.cause, exceptions.RaySystemError
    )


def after_worker_death(
    names: Sequence[str],
    marks: Sequence[Optional[Tuple[int, int]]],
    exc: BaseException,
    left: Sequence[State] = (),
    limits: Sequence[Optional[float]] = (),
) -> List[Optional[State]]:
    """Each call's State after the worker of its batch died; None for a call to run again.

    :param names: the task run names of the batch's calls, in the order they run
    :param marks: each call's (pid that started it, pid that finished it) from the slot
        table, 0 for "not marked", ``-pid`` as the second for a call that went past
        its time limit; None for a call that had no slot
    :param exc: what Ray said
    :param left: the States of the first calls, which had finished, that a worker
        ending at a call's limit left (see :func:`left_states`)
    :param limits: each call's time limit in seconds, or None
    """
    # Nothing marked at all: the worker could not open the table (another machine), or
    # it died before its first call. Either way the first call is taken as started.
    table_works = any(mark is not None and mark[0] for mark in marks)
    states: List[Optional[State]] = []
    for index, (name, mark) in enumerate(zip(names, marks)):
        started, finished = mark if mark is not None else (0, 0)
        limit = limits[index] if index < len(limits) else None
        if finished < 0:
            states.append(timed_out_state(name, limit or 0.0))
        elif finished and index < len(left):
            states.append(left[index])  # delivered by the worker that ended at a limit
        elif finished:
            states.append(_lost_state(name, exc))
        elif started or (index == 0 and not table_works):
            if limit is not None and not table_works:
                states.append(maybe_timed_out_state(name, limit, exc))
            else:
                states.append(crash_state(name, exc))
        elif table_works and mark is not None:
            states.append(None)  # never started: safe to run elsewhere
        else:
            states.append(_start_unknown_state(name, exc))
    return states


def _lost_state(name: str, exc: BaseException) -> State:
    return Crashed(
        message=f"Call {name!r} finished in a Ray worker that died before the results of "
        f"its batch reached this process: its result was lost with the worker, and it was "
        f"not run again. Ray: {type(exc).__name__}: {exc}",
        data=exc,
    )


def _start_unknown_state(name: str, exc: BaseException) -> State:
    return Crashed(
        message=f"The Ray worker running the batch of call {name!r} died, and whether the "
        "call had started is unknown (a worker on another machine cannot mark the calls "
        "it starts): it was not run again, so that no call ever runs twice. Ray: "
        f"{type(exc).__name__}: {exc}",
        data=exc,
    )


def as_marks(table: Any, slots: Optional[range], count: int) -> List[Optional[Tuple[int, int]]]:
    """The marks of ``count`` calls in ``slots`` of ``table`` (all None if they have none)."""
    if table is None or slots is None:
        return [None] * count
    return [table.marks(slot) for slot in slots]


def maybe_timed_out_state(name: str, limit: float, exc: BaseException) -> State:
    """Call ``name`` with a limit whose worker died, and nothing marked it timed out."""
    return Crashed(
        message=f"The Ray worker running call {name!r} ended before the call's result "
        f"reached this process, perhaps at the call's limit of {limit:g} s "
        "(timeout_seconds): its worker could not mark the call timed out (a worker on "
        "another machine cannot open the runner's slot table); the call was not run "
        f"again. Ray: {type(exc).__name__}: {exc}",
        data=exc,
    )


def left_states(table: Any, slots: Optional[range], names: Sequence[str]) -> List[State]:
    """The States a worker that ended at a call's limit left for the calls of its batch
    before that one (read once: the file is removed); none if it left nothing."""
    if table is None or slots is None:
        return []
    outcomes, _ = table.left_outcomes(slots, names)
    return [state for state, _ in outcomes]
