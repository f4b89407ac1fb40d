"""run_fns for tests/test_dask.py. Pickled by value, so workers need not import the tests."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time
import uuid

from taskrunners.states import Completed
from tests.support.payloads import return_value


def current_key():
    """The Dask key of the task running this call, read on the worker."""
    import distributed

    return Completed(data=distributed.get_worker().get_current_task())


def fresh_token():
    return Completed(data=uuid.uuid4().hex)


def die():
    """Kill the worker process running this call, as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def die_once(marker):
    """Kill the worker the first time; any later attempt completes."""
    path = pathlib.Path(marker)
    if not path.exists():
        path.touch()
        die()
    return Completed(data="survived")


def fail_until(directory, failures):
    """Raise on the first ``failures`` attempts (counted in ``directory``), then complete."""
    attempts = len(os.listdir(directory)) + 1
    pathlib.Path(directory, f"attempt-{attempts}").touch()
    if attempts <= failures:
        raise ValueError(f"attempt {attempts} fails")
    return Completed(data=attempts)


def submit_through(runner, value):
    """Runs on a worker: ``runner`` was unpickled there; submit a call through it and wait."""
    from taskrunners import TaskRun

    future = runner.submit(TaskRun(name="inner"), return_value, {"value": value})
    state = runner.wait(future, timeout=60)
    return Completed(data=(state.result(), runner._client is not None))


async def async_sleep_registered(seconds):
    """Sleep in a coroutine: the worker's registry of running coroutine calls sees it."""
    import anyio

    await anyio.sleep(seconds)
    return Completed(data=seconds)


def running_coroutines():
    """Runs on workers (``Client.run``): how many coroutine calls are running there."""
    from taskrunners._core.dask import worker as dask_worker

    return sum(1 for running in dask_worker._running.values() if running is not None)


def record_run(directory, name):
    """Leave a file ``name`` in ``directory``: the proof that this call ran."""
    pathlib.Path(directory, name).touch()
    return Completed(data=name)


def log_at(logger_name, level, message):
    logging.getLogger(logger_name).log(level, message)
    return Completed(data=os.getpid())


def counted(directory, name, how="return"):
    """Count a run of call ``name`` (one character more in its file in ``directory``),
    then behave as ``how`` says; by default complete with the Dask key of the task
    running it (in a batch, the batch's key)."""
    with open(os.path.join(directory, name), "a") as file:
        file.write("x")
    if how == "raise":
        raise ValueError(f"{name} broke")
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "unpicklable":
        return Completed(data=threading.Lock())
    if how == "die":
        die()
    if how == "die-once":
        return die_once(os.path.join(directory, f"{name}-died"))
    return current_key()


def runs_of(directory, name):
    """How many times call ``name`` of :func:`counted` ran."""
    path = pathlib.Path(directory, name)
    return len(path.read_text()) if path.exists() else 0


def sleepy_key(seconds):
    """Sleep, then complete with the Dask key of the task running this call."""
    time.sleep(seconds)
    return current_key()


def key_and_annotations():
    """The Dask key of the task running this call and its annotations, read on the worker."""
    import distributed

    worker = distributed.get_worker()
    key = worker.get_current_task()
    return Completed(data=(key, dict(worker.state.tasks[key].annotations or {})))
