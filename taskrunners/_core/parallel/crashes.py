"""Why a call of the Parallel runner ended without a State of its own, in words.

Each failure mode of the process pool (see :mod:`~taskrunners._core.parallel.pool`)
gives the calls it hits a Crashed state built here, with a message that names the
task run, what happened and, where the user can act, what to do:

- a worker that died: the call it was running, calls running in the other workers,
  calls that had finished but whose results were lost with the pool, and calls that
  never started because pool after pool broke (:func:`broken_pool_state`,
  :func:`never_started_state`);
- a run_fn or argument that cannot be pickled (:func:`pickling_failure`);
- an ``initializer`` that raised in the workers (:func:`initializer_failure`);
- the ``start()`` block left with an exception while the call ran
  (:func:`stopped_state`);
- the pool refusing a batch (:func:`handover_failure`, :func:`pool_failure`).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from typing import Any, Callable, Dict, Optional

import cloudpickle

from taskrunners._core.parallel import loky_private
from taskrunners._core.parallel.worker import INITIALIZER_ERROR_FILE
from taskrunners._core.remote.slots import TIMED_OUT_EXIT_CODE
from taskrunners._core.futures import TaskRun
from taskrunners.states import Crashed, State

__all__ = [
    "describe",
    "describe_exit",
    "pool_cause",
    "broken_pool_state",
    "never_started_state",
    "every_pool_broke_state",
    "pickling_failure",
    "initializer_failed",
    "initializer_failure",
    "stopped_state",
    "handover_failure",
    "pool_failure",
]


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def describe_exit(exitcode: Optional[int]) -> str:
    """How a worker process ended, from its exit code: "was killed by SIGKILL (...)"."""
    if exitcode is None:
        return "stopped for an unknown reason"
    if exitcode == TIMED_OUT_EXIT_CODE:
        return f"ended itself as a call went past its time limit (exit code {exitcode})"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def pool_cause(dead: Optional[Dict[int, Optional[int]]], broken: Optional[BaseException]) -> str:
    """Which workers died and how (``dead``: exit codes by pid), or loky's error."""
    if dead:
        return "; ".join(
            f"worker process (pid {pid}) {describe_exit(code)}" for pid, code in sorted(dead.items())
        )
    return loky_private.break_summary(broken)


def broken_pool_state(
    name: str, started: int, finished: int, dead: Dict[int, Optional[int]], cause: str
) -> State:
    """A call that had started (in worker ``started``) when a worker died."""
    if started in dead:
        how = describe_exit(dead[started])
        if finished:
            message = (
                f"Task run {name!r} finished in worker process (pid {started}), but the "
                f"worker {how} before its result reached this process; the call was not "
                "run again."
            )
        else:
            message = (
                f"The worker process (pid {started}) running task run {name!r} died "
                f"unexpectedly: it {how}. A segfault, the out-of-memory killer or "
                "os._exit() in the call can cause this."
            )
    elif finished:
        message = (
            f"Task run {name!r} finished in worker process (pid {started}), but its result "
            f"was lost when another worker of the pool died unexpectedly ({cause}); the "
            "call was not run again."
        )
    else:
        message = (
            f"Task run {name!r} was running in worker process (pid {started}) when another "
            f"worker of the pool died unexpectedly ({cause}); the pool was stopped with the "
            "call unfinished, and the call was not run again."
        )
    return Crashed(message=message, data=loky_private.worker_died_error(message))


def never_started_state(name: str, handovers: int, cause: str) -> State:
    """A call that pool after pool broke before any worker started it."""
    message = (
        f"Task run {name!r} never started: the process pool broke {handovers} times "
        f"before a worker took it (last: {cause})."
    )
    return Crashed(message=message, data=loky_private.worker_died_error(message))


def every_pool_broke_state(name: str, cause: str) -> State:
    """A call that no pool would take: each new one was broken at once."""
    message = (
        f"Task run {name!r} could not be handed to the worker processes: every new pool "
        f"broke at once ({cause})."
    )
    return Crashed(message=message, data=loky_private.worker_died_error(message))


def pickling_failure(task_run: TaskRun, run_fn: Callable[..., Any], exc: Exception) -> State:
    """A call whose run_fn or arguments cannot be pickled: which of the two, and the fix."""
    try:
        cloudpickle.dumps(run_fn)
    except Exception:
        what = "run_fn"
    else:
        what = "the arguments (run_kwargs)"
    return Crashed(
        message=f"Task run {task_run.name!r} was not started: {what} could not be pickled to "
        f"send to a worker process: {describe(exc)}. Pass only values that cloudpickle can "
        "serialize, or create the value inside run_fn.",
        data=exc,
    )


def initializer_failed(directory: str) -> bool:
    """Whether the workers' ``initializer`` raised (its traceback is in ``directory``)."""
    return os.path.exists(os.path.join(directory, INITIALIZER_ERROR_FILE))


def initializer_failure(directory: str, name: str) -> State:
    """A call that could not start because the workers' ``initializer`` raised."""
    try:
        with open(os.path.join(directory, INITIALIZER_ERROR_FILE)) as file:
            details = file.read().strip()
    except OSError:
        details = ""
    last_line = details.splitlines()[-1] if details else "an error"
    message = (
        f"Task run {name!r} could not start: the worker processes' `initializer` raised "
        f"{last_line}. Fix the initializer given to ParallelTaskRunner.\n{details}"
    )
    return Crashed(message=message, data=RuntimeError(message))


def stopped_state(name: str, started: int, finished: int, reason: Optional[BaseException]) -> State:
    """A call that had started when the ``start()`` block was left with ``reason``."""
    if finished:
        message = (
            f"Task run {name!r} finished in worker process (pid {started}), but its result "
            f"was lost: the runner's start() block was left with {reason!r}, which "
            "terminates the worker processes."
        )
    else:
        message = (
            f"Task run {name!r} was stopped in worker process (pid {started}): the runner's "
            f"start() block was left with {reason!r}, which terminates the worker processes."
        )
    return Crashed(message=message, data=concurrent.futures.CancelledError(message))


def handover_failure(name: str, exc: BaseException) -> State:
    """A call the pool refused to take (no worker process could be started, say)."""
    message = f"Task run {name!r} could not be handed to the worker processes: {describe(exc)}"
    return Crashed(message=message, data=exc)


def pool_failure(name: str, error: BaseException) -> State:
    """A call whose loky task failed for another reason than a worker's death."""
    message = f"The process pool could not run task run {name!r}: {describe(error)}"
    return Crashed(message=message, data=error)
