"""What runs in the Parallel runner's loky worker processes.

- :func:`initialize_worker`, loky's initializer: a worker leaves with its parent, and
  an ``initializer`` given to the runner runs, its traceback kept for the parent.
- :func:`run_batch_call` runs one batch, one loky task: it unpickles the batch's
  calls, runs them in order, marking each started and finished in the pool's slot
  table (:mod:`~taskrunners._core.remote.slots`), and pickles their States, the seconds
  each took and the log records they emitted for the trip back. With a
  ``worker_memory_limit``, a worker whose resident memory went above it after a call
  starts no other call (see :mod:`~taskrunners._core.parallel.recycling`) and says so.
  A call with a time limit that passes it ends the worker process (see
  ``remote.slots.Marks.expiry``): the call's ``finally`` blocks do not run, and the
  parent settles the batch from the slot table.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence, Tuple

from taskrunners._core.parallel.recycling import MemoryWatch
from taskrunners._core.remote.protocol import encode_batch, load_call, run_batch
from taskrunners._core.remote.records import captured_records
from taskrunners._core.remote.slots import Marks
from taskrunners.states import State

__all__ = ["INITIALIZER_ERROR_FILE", "initialize_worker", "run_batch_call"]

#: Where, in the runner's folder, a failing ``initializer`` leaves its traceback.
INITIALIZER_ERROR_FILE = "initializer-error"
# How often (seconds) a worker checks that the process that started it is alive.
_PARENT_CHECK_INTERVAL = 0.5
_WHERE = "the worker process"
# This worker's watch of its resident memory, made by its first batch with a limit.
_memory: Optional[MemoryWatch] = None


def run_batch_call(
    payload: bytes,
    names: Sequence[str],
    table_path: str,
    slots: range,
    log_level: int,
    memory_limit: Optional[int] = None,
) -> Tuple[Optional[bytes], int]:
    """Run a pickled batch, ``([run_fn, ...], [run_kwargs, ...])``, call by call.

    Returns what :func:`~taskrunners._core.remote.protocol.encode_batch` makes of the calls'
    States, or None when a batch of several calls cannot be unpickled here: nothing
    ran, and the parent sends its calls again one by one to find the one at fault;
    and the worker's resident memory once above ``memory_limit``, else 0: the calls
    not marked started then did not run, and go to another worker.
    """
    global _memory
    outcomes: List[Tuple[State, float]]
    watch = None
    if memory_limit is not None:
        if _memory is None or _memory.limit != memory_limit:
            _memory = MemoryWatch(memory_limit)
        watch = _memory
        if watch.resident:  # a batch queued behind the call that went past the limit
            return None, watch.resident  # nothing ran
    with captured_records(log_level) as emitted:
        run_fns, loaded = load_call(payload, names[0], _WHERE)  # loaded: kwargs, or a State
        if run_fns is None:
            if len(names) > 1:
                return None, 0
            outcomes = [(loaded, 0.0)]  # 0.0: it did not run (not a duration)
        else:
            del payload
            marks = Marks(table_path, slots)
            ran: List[Tuple[State, float, Optional[BaseException]]] = []  # read at a limit
            marks.watch(names, ran, emitted, _WHERE)
            calls = marks.limits(list(zip(run_fns, loaded)))
            starting: Callable[[int], bool]
            finished: Callable[[int], None]
            if watch is None:
                starting, finished = marks.started, marks.finished
            else:
                starting, finished = watch.wrap(marks)
            try:
                run_batch(calls, None, starting, finished, marks.expiry, names, ran)
            finally:
                marks.close()
            del calls
            del run_fns, loaded  # the worker keeps no argument alive until its next batch
            outcomes = [(state, seconds) for state, seconds, _ in ran]
            del ran
            if watch is not None:
                watch.crash_alone(names, outcomes)
    return encode_batch(names, outcomes, emitted, _WHERE), watch.resident if watch else 0


def initialize_worker(
    parent_pid: int,
    error_path: str,
    initializer: Optional[Callable[..., Any]],
    initargs: Tuple[Any, ...],
) -> None:
    """Prepare a new worker process, then run the runner's ``initializer`` in it."""
    # A worker blocks on loky's queue forever once its parent is gone (killed with
    # SIGKILL, say): leave with it instead of lingering as an orphan.
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="exit-with-parent", daemon=True
    ).start()
    if initializer is None:
        return
    try:
        initializer(*initargs)
    except BaseException:
        # loky only logs the error and lets the worker exit: keep it for the parent.
        with open(error_path, "w") as file:
            file.write(traceback.format_exc())
        raise


def _exit_with_parent(parent_pid: int) -> None:
    # An orphan is adopted by another process; on Windows the check never fires.
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_CHECK_INTERVAL)
    os._exit(1)
