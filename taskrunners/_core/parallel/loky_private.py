"""What the Parallel runner reads of loky beyond its public API, each behind one function.

loky's public names (``loky.ProcessPoolExecutor``, ``loky.cpu_count``,
``loky.BrokenProcessPool``) are used directly; every private one is read here and
nowhere else, by a small function that falls back to a safe default when an installed
loky no longer has it:

================================  ==============================================
function                          private name of loky it reads
================================  ==============================================
:func:`call_queue_size`           ``loky.process_executor.EXTRA_QUEUED_CALLS``
:func:`worker_died_error`         ``loky.process_executor.TerminatedWorkerError``
:func:`is_shutdown_error`         ``loky.process_executor.ShutdownExecutorError``
:func:`stopped_workers`           ``ProcessPoolExecutor._processes``
:func:`no_wakeup`                 ``ProcessPoolExecutor._executor_manager_thread_wakeup``
:func:`manager_thread`            ``ProcessPoolExecutor._executor_manager_thread``
:func:`track_folder`,             ``loky.backend.resource_tracker``
:func:`untrack_folder`
================================  ==============================================

:func:`required` lists these functions and :func:`missing` those whose private name
the installed loky lacks (``tests/test_parallel.py`` fails, naming each). Checked against loky 3.7.0.

Two behaviours of loky, not names, are relied on too, and covered by the Parallel
tests: it runs a broken pool's future callbacks before it kills the surviving workers
(so :func:`stopped_workers` then lists the workers that died on their own), and it
only logs an ``initializer`` that raises, then lets the worker exit.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

import loky
from loky import process_executor as _process_executor

__all__ = [
    "call_queue_size",
    "worker_died_error",
    "is_shutdown_error",
    "stopped_workers",
    "no_wakeup",
    "manager_thread",
    "break_summary",
    "track_folder",
    "untrack_folder",
    "required",
    "available",
    "missing",
]

# loky 3.x's value: its call queue holds 2 * max_workers + 1 calls.
_EXTRA_QUEUED_CALLS = 1


def call_queue_size(max_workers: int) -> int:
    """How many calls loky holds at once, running or waiting on its workers' queue.

    Fallback: loky 3.x's size, ``2 * max_workers + 1``.
    """
    extra = getattr(_process_executor, "EXTRA_QUEUED_CALLS", _EXTRA_QUEUED_CALLS)
    return 2 * max_workers + extra


def worker_died_error(message: str) -> BaseException:
    """The error loky gives calls when a worker dies: ``TerminatedWorkerError(message)``.

    Fallback: ``loky.BrokenProcessPool``, its public base class.
    """
    error_type = getattr(_process_executor, "TerminatedWorkerError", loky.BrokenProcessPool)
    return error_type(message)


def is_shutdown_error(error: BaseException) -> bool:
    """Whether loky gave ``error`` to a call because its executor was shut down.

    Fallback: False; a call the runner did not stop itself is then Crashed with the
    error, as for any other failure of the pool.
    """
    error_type = getattr(_process_executor, "ShutdownExecutorError", None)
    return error_type is not None and isinstance(error, error_type)


def stopped_workers(executor: Any) -> Dict[int, Optional[int]]:
    """Exit codes of the executor's workers that have stopped, by pid.

    Reads loky's private map of worker processes. Called from the first callback
    of a break, it lists the workers that died on their own: loky runs the callbacks
    before it kills the surviving workers and empties the map. Fallback: ``{}``;
    messages then quote loky's error instead (see :func:`break_summary`).
    """
    processes = getattr(executor, "_processes", None)
    if not isinstance(processes, dict):
        return {}
    return {pid: p.exitcode for pid, p in list(processes.items()) if p.exitcode is not None}


class _NoWakeup:
    def wakeup(self) -> None:
        pass


@contextlib.contextmanager
def no_wakeup(executor: Any) -> Iterator[None]:
    """Within, ``executor.submit`` does not wake the executor's manager thread up.

    Only for a submit from a callback on that manager thread: the manager is awake
    and, once the callback returns, moves every pending call to its workers' queue,
    so a wake-up (a pipe write, then a turn of the manager that finds nothing to do)
    is wasted; so is one from another thread meanwhile (a submit, a shutdown) for the
    same reason. About a third of the manager's turns with ``batch_size=1``.
    Fallback: the wake-ups happen.
    """
    wakeup = getattr(executor, "_executor_manager_thread_wakeup", None)
    if not hasattr(wakeup, "wakeup"):
        yield
        return
    executor._executor_manager_thread_wakeup = _NoWakeup()
    try:
        yield
    finally:
        executor._executor_manager_thread_wakeup = wakeup


def manager_thread(executor: Any) -> Optional[threading.Thread]:
    """The executor's manager thread, if it started: it joins the workers on shutdown.

    Read before a ``shutdown(wait=False)``, which forgets it, to join it later.
    Fallback: None; the runner's block then does not wait for retired workers to exit.
    """
    thread = getattr(executor, "_executor_manager_thread", None)
    return thread if isinstance(thread, threading.Thread) else None


def break_summary(error: Optional[BaseException]) -> str:
    """One line of loky's error for a broken pool: the one with the exit codes, if any."""
    lines = str(error or "").strip().splitlines()
    codes = [line.strip() for line in lines if "exit codes" in line]
    return (codes or lines or ["unknown cause"])[0]


def track_folder(path: str) -> None:
    """Have loky's resource tracker remove ``path`` if this process dies first.

    Fallback: nothing; the runner still removes the folder when its block ends.
    """
    register = _resource_tracker_function("register")
    if register is not None:
        register(path, "folder")


def untrack_folder(path: str) -> None:
    """Undo :func:`track_folder` (the folder is removed). Fallback: nothing."""
    unregister = _resource_tracker_function("unregister")
    if unregister is not None:
        unregister(path, "folder")


def _resource_tracker_function(name: str) -> Optional[Callable[[str, str], None]]:
    try:
        from loky.backend import resource_tracker
    except ImportError:
        return None
    return getattr(resource_tracker, name, None)


_MISSING = object()


def _has_attribute(name: str, check: Callable[[Any], bool]) -> Callable[[], bool]:
    def has() -> bool:
        # Made in __init__; an executor that never ran starts no process.
        executor = loky.ProcessPoolExecutor(max_workers=1)
        try:
            return check(vars(executor).get(name, _MISSING))
        finally:
            executor.shutdown(wait=True)

    return has


_CHECKS: Dict[str, Callable[[], bool]] = {
    "call_queue_size": lambda: hasattr(_process_executor, "EXTRA_QUEUED_CALLS"),
    "worker_died_error": lambda: hasattr(_process_executor, "TerminatedWorkerError"),
    "is_shutdown_error": lambda: hasattr(_process_executor, "ShutdownExecutorError"),
    "stopped_workers": _has_attribute("_processes", lambda value: isinstance(value, dict)),
    "no_wakeup": _has_attribute(
        "_executor_manager_thread_wakeup", lambda value: hasattr(value, "wakeup")
    ),
    "manager_thread": _has_attribute("_executor_manager_thread", lambda value: value is None),  # until it runs
    "track_folder": lambda: _resource_tracker_function("register") is not None,
    "untrack_folder": lambda: _resource_tracker_function("unregister") is not None,
}


def required() -> List[str]:
    """The functions here that read a private name of loky."""
    return list(_CHECKS)


def available(function: str) -> bool:
    """Whether the installed loky has what ``function`` reads (else it falls back)."""
    return _CHECKS[function]()


def missing() -> List[str]:
    """The functions here that fall back, as the installed loky lacks what they read.

    >>> missing()
    []
    """
    return [function for function in required() if not available(function)]

