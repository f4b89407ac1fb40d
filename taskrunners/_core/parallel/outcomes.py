"""What a batch's outcome in loky means for each of its calls (on loky's manager thread).

A batch comes back as its calls' States, as unrun (the worker could not unpickle it),
with some calls unrun (the worker went above ``worker_memory_limit``: the slot table
tells which started), or as an error: the pool shutting down, a broken executor (its
worker died: the slot table tells which calls had started), or anything else loky
raises. :func:`settle_batch` settles each call it can and names those to send again.

A worker that ended itself because a call went past its time limit breaks its executor
too: that call is TimedOut, the calls of its batch that had finished get the States
the worker left beside the slot table, and those not started go again (that handover
does not count against :data:`MAX_HANDOVERS`).
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import List, Optional

import loky

from taskrunners._core.batching import Durations, Entry, Sendable
from taskrunners._core.parallel import loky_private
from taskrunners._core.parallel.calls import Batch
from taskrunners._core.parallel.crashes import (
    broken_pool_state,
    initializer_failed,
    initializer_failure,
    never_started_state,
    pool_failure,
    stopped_state,
)
from taskrunners._core.parallel.generation import Generation
from taskrunners._core.limits import split_limit, timed_out_state
from taskrunners._core.remote.protocol import decode_batch
from taskrunners._core.remote.records import emit
from taskrunners._core.remote.slots import TIMED_OUT_EXIT_CODE
from taskrunners.states import State

__all__ = ["MAX_HANDOVERS", "settle_batch"]

#: A call that meets this many broken pools before any worker starts it is Crashed
#: instead of being handed to yet another pool.
MAX_HANDOVERS = 3


def settle_batch(
    batch: Batch,
    generation: Generation,
    slots: range,
    submitted: concurrent.futures.Future,
    durations: Durations,
    abort_reason: Optional[BaseException],
    directory: str,
) -> List[Sendable[None]]:
    """Settle the calls of a batch loky is done with; the entries to send again.

    :param generation: the pool that ran it, and ``slots`` its calls' slots there
    :param submitted: loky's future of the batch
    :param durations: where the seconds its calls ran are recorded
    :param abort_reason: why the block was left, if it was left with an exception
    :param directory: the pool's folder (where a failed initializer leaves its error)
    """
    try:
        data, over_memory = submitted.result(0)
    except BaseException as exc:
        error = exc
    else:
        if over_memory:
            generation.over_memory()  # replaced before it takes another batch
        if data is None:
            if over_memory:  # it ran none of them: another worker will
                return list(batch.entries)
            # The worker could not unpickle the batch, and ran none of it: each call
            # goes again in a batch of its own (a group of its own), to find the one
            # at fault.
            return [Entry(entry.call, entry.key, ("apart", entry.call), None) for entry in batch.entries]
        return _deliver(batch, data, durations, generation, slots if over_memory else None)
    if loky_private.is_shutdown_error(error) or abort_reason is not None:
        for entry, slot in zip(batch.entries, slots):
            started, finished = generation.marks(slot)
            if finished < 0:
                entry.call.set_result(_timed_out(entry))
            elif started:
                state = stopped_state(entry.call.task_run.name, started, finished, abort_reason)
                entry.call.set_result(state)
            else:
                entry.call.set_cancelled()
        return []
    if not isinstance(error, loky.BrokenProcessPool):
        batch.settle(functools.partial(pool_failure, error=error))
        return []
    return _after_break(batch, generation, slots, error, directory)


def _deliver(
    batch: Batch, data: bytes, durations: Durations, generation: Generation, unrun: Optional[range]
) -> List[Sendable[None]]:
    # ``unrun``: the slots of a batch whose worker went above its memory limit, and
    # then started none of the calls left: those go again.
    outcomes, records = decode_batch(batch.names, data)
    if records:
        emit(records)
    # 0.0: a call that did not run (its batch could not be unpickled here).
    seconds = [spent for _, spent in outcomes if spent > 0]
    if seconds:
        durations.record(batch.entries[0].key, sum(seconds), len(seconds))
    if unrun is None:
        for entry, (state, _) in zip(batch.entries, outcomes):
            entry.call.set_result(state)
        return []
    again: List[Sendable[None]] = []
    for entry, (state, _), slot in zip(batch.entries, outcomes, unrun):
        if generation.marks(slot)[0]:
            entry.call.set_result(state)
        else:
            again.append(entry)
    return again


def _after_break(
    batch: Batch, generation: Generation, slots: range, error: BaseException, directory: str
) -> List[Sendable[None]]:
    generation.broke_under(error)
    dead, cause = generation.dead or {}, generation.cause()
    # A worker that ended at a call's time limit left the States of the calls of its
    # batch that had finished.
    left, records = generation.slots.left_outcomes(slots, batch.names)
    if records:
        emit(records)
    timed_out = TIMED_OUT_EXIT_CODE in dead.values()
    again: List[Sendable[None]] = []
    for index, (entry, slot) in enumerate(zip(batch.entries, slots)):
        call = entry.call
        started, finished = generation.marks(slot)
        if finished < 0:
            call.set_result(_timed_out(entry))
            continue
        if started and finished and index < len(left):
            call.set_result(left[index][0])  # delivered
            continue
        if started:
            call.set_result(broken_pool_state(call.task_run.name, started, finished, dead, cause))
            continue
        if timed_out:
            call.handovers -= 1  # a limit, not a broken pool: this one does not count
        if initializer_failed(directory):
            call.set_result(initializer_failure(directory, call.task_run.name))
        elif call.handovers >= MAX_HANDOVERS:
            call.set_result(never_started_state(call.task_run.name, call.handovers, cause))
        else:
            again.append(entry)  # on a fresh pool
    return again


def _timed_out(entry: Sendable[None]) -> State:
    """The State of a call that went past its time limit in its worker."""
    call = entry.call
    _, seconds = split_limit(call.run_fn)
    return timed_out_state(call.task_run.name, seconds or 0.0)
