"""run_fns for the ParallelTaskRunner tests. Pickled by value, so workers need not import tests."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import threading
import time

from taskrunners.states import Completed
from tests.support.waiting import wait_for_path


def note_start(log, tag):
    """Append ``tag`` to the file ``log``: one line per time a call started."""
    with open(log, "a") as file:
        file.write(f"{tag}\n")


def started_calls(log):
    path = pathlib.Path(log)
    return sorted(path.read_text().split()) if path.exists() else []


def record_and_return(log, tag, value=None):
    note_start(log, tag)
    return Completed(data=value)


def record_then(log, tag, then="return"):
    """Note the start, then return ``tag``, raise (``then="raise"``) or kill this worker
    (``then="exit"``, exit code 3): one task whose calls behave differently in a batch."""
    note_start(log, tag)
    if then == "exit":
        os._exit(3)
    if then == "raise":
        raise ValueError(f"{tag} refused")
    return Completed(data=tag)


def record_and_sleep(log, tag, marker, seconds):
    """Note the start, leave ``marker`` holding this worker's pid, then sleep."""
    note_start(log, tag)
    pathlib.Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return Completed(data=tag)


def die_once_marker_exists(log, tag, marker, how):
    """Wait until the other worker is busy (``marker``), then kill this worker."""
    note_start(log, tag)
    wait_for_path(marker)
    die(how)
    return Completed(data="survived")


def die(how):
    """Kill this worker: ``os._exit(3)``, SIGKILL, or a segfault."""
    if how == "exit":
        os._exit(3)
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segfault":
        import ctypes

        ctypes.string_at(0)
    time.sleep(60)


def sleep_and_return(seconds, value):
    """Sleep, then return ``value`` and this worker's pid."""
    time.sleep(seconds)
    return Completed(data=(value, os.getpid()))


def die_after(seconds, how):
    """Sleep, then kill this worker (see :func:`die`)."""
    time.sleep(seconds)
    die(how)
    return Completed(data="survived")


def record_and_return_pid(log, tag):
    """Note the start, then return this worker's pid."""
    note_start(log, tag)
    return Completed(data=os.getpid())


def record_then_die_once(log, tag, marker, die_here=False):
    """Note the start; return ``tag`` and the pid, or, if ``die_here``, exit (code 3)
    once ``marker`` exists (another worker is running)."""
    note_start(log, tag)
    if die_here:
        wait_for_path(marker)
        os._exit(3)
    return Completed(data=(tag, os.getpid()))


def record_mark_and_sleep(log, tag, marker, seconds):
    """Note the start, leave ``marker``, sleep, then return ``tag`` and the pid."""
    note_start(log, tag)
    pathlib.Path(marker).touch()
    time.sleep(seconds)
    return Completed(data=(tag, os.getpid()))


def keep_megabytes(megabytes):
    """Allocate ``megabytes`` MB and keep them in this worker (touched: resident); the pid."""
    import sys

    kept = sys.__dict__.setdefault("_taskrunners_tests_kept", [])
    block = bytearray(megabytes * 10**6)
    for index in range(0, len(block), 4096):
        block[index] = 1
    kept.append(block)
    return Completed(data=os.getpid())


def pid_and_environment(*names):
    return Completed(data=(os.getpid(), {name: os.environ.get(name) for name in names}))


def set_environment(name, value):
    """An initializer: the calls in the worker see ``name`` set to ``value``."""
    os.environ[name] = value


def failing_initializer():
    raise ValueError("initializer refused to start")


async def where_coroutines_run():
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    return Completed(data=(os.getpid(), loop.is_running()))


def log_some_records(logger_name):
    logger = logging.getLogger(logger_name)
    logger.debug("debug %s", "hidden")
    logger.info("hello %s", "there")
    logger.warning("careful: %d", 3)
    try:
        raise ValueError("logged failure")
    except ValueError:
        logger.exception("it failed")

    # Records from other threads of the worker are not the call's.
    thread = threading.Thread(target=logger.warning, args=("from another thread",))
    thread.start()
    thread.join()
    return Completed(data=os.getpid())


def value_once_file_exists(path, value):
    wait_for_path(path)
    return Completed(data=value)


def exit_at_start():
    """An initializer that kills the worker before it takes any call."""
    os._exit(5)


class RefusedError(Exception):
    """An error that cannot be rebuilt from its message alone, holding an unpicklable value."""

    def __init__(self, message, value):
        super().__init__(message)
        self.value = value


class RefusesPickling:
    def __reduce__(self):
        raise RefusedError("this value refuses to be pickled", threading.Lock())


def return_refusing_value():
    return Completed(data=RefusesPickling())
