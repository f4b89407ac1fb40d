"""run_fns for tests/test_ray.py that only make sense inside a Ray worker.

Registered for pickling by value (Ray's cloudpickle and ours), like payloads.py.
"""

from __future__ import annotations

import os
import signal

from taskrunners.states import Completed


def record(marker: str) -> None:
    with open(marker, "a") as file:
        file.write(f"{os.getpid()}\n")


def die(how: str, marker: str):
    """Leave a line in ``marker``, then end the worker process mid-call."""
    record(marker)
    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError(how)


def receive_and_record(states, marker: str):
    """Completed with ``states`` (upstream States), leaving a line in ``marker``."""
    record(marker)
    return Completed(data=states)


def assigned_resources():
    """The Ray resources this call holds, e.g. ``{"CPU": 1.0}``."""
    import ray

    return Completed(data=ray.get_runtime_context().get_assigned_resources())


class Unhashable:
    """A run_fn that cannot be a weak dictionary key: ``Completed(data=value)``."""

    __hash__ = None

    def __call__(self, value):
        return Completed(data=value)


def ray_task_id():
    """Completed with the id of the Ray task running this call: calls of one batch share it."""
    import ray

    return Completed(data=ray.get_runtime_context().get_task_id())


def act(how: str, marker: str, value=None):
    """Leave a line in ``marker``, then: "return" ``value``, "raise" LookupError, "exit"
    the worker process, "exit-at-gate": exit once the file ``value`` exists, or return
    "not-a-state". One run_fn, so the calls share a batch."""
    record(marker)
    if how == "exit-at-gate":
        from tests.support.waiting import wait_for_path

        wait_for_path(value, patience=150)
        os._exit(3)
    if how == "return":
        return Completed(data=value)
    if how == "raise":
        raise LookupError(value)
    if how == "exit":
        os._exit(3)
    if how == "not-a-state":
        return value
    raise AssertionError(how)
