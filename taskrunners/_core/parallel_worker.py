"""What runs in the Parallel runner's loky worker processes.

- :func:`initialize_worker`, loky's initializer: a worker leaves with its parent, and
  an ``initializer`` given to the runner runs, its traceback kept for the parent.
- :func:`run_call` runs one call: it marks the call started in the pool's slot table,
  runs it to a State with the log records it emits, pickles both for the trip back,
  and marks the call finished.
- The slot table's layout (:data:`SLOT`), which the parent reads after a pool broke to
  tell calls that started from calls that never did.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
import traceback
from typing import Any, Callable, Dict, Optional, Tuple

from taskrunners._core.records import captured_records
from taskrunners._core.remote import encode_outcome, load_call, run_in_worker

__all__ = ["SLOT", "INITIALIZER_ERROR_FILE", "initialize_worker", "run_call"]

#: One slot per call handed to a pool: (pid of the worker that started the call, pid
#: of the worker that finished it), 0 meaning "not yet".
SLOT = struct.Struct("=ii")
_PID = struct.Struct("=i")
#: Where, in the runner's folder, a failing ``initializer`` leaves its traceback.
INITIALIZER_ERROR_FILE = "initializer-error"
# How often (seconds) a worker checks that the process that started it is alive.
_PARENT_CHECK_INTERVAL = 0.5
_WHERE = "the worker process"

_tables: Dict[str, mmap.mmap] = {}


def _slot_table(path: str) -> mmap.mmap:
    table = _tables.get(path)
    if table is None:
        with open(path, "r+b") as file:
            table = mmap.mmap(file.fileno(), 0)
        _tables[path] = table
    return table


def run_call(payload: bytes, name: str, table_path: str, slot: int, log_level: int) -> bytes:
    """Run one pickled call; its State and log records, pickled (see ``remote``)."""
    pid = os.getpid()
    table = _slot_table(table_path)
    offset = slot * SLOT.size
    _PID.pack_into(table, offset, pid)
    with captured_records(log_level) as emitted:
        run_fn, loaded = load_call(payload, name, _WHERE)  # loaded: run_kwargs, or a State
        del payload
        state = loaded if run_fn is None else run_in_worker(run_fn, loaded)[0]
        del run_fn, loaded  # the worker keeps no argument alive until its next call
    outcome = encode_outcome(name, state, emitted, _WHERE)
    _PID.pack_into(table, offset + _PID.size, pid)
    return outcome


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
