"""run_fns for the tests. Pickled by value, so they run the same in worker processes."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
import time

import anyio

from taskrunners.states import Completed, Failed
from tests.support.waiting import holds_within, wait_for_path


def return_value(value=None):
    return Completed(data=value)


async def async_return_value(value=None):
    await anyio.sleep(0)
    return Completed(data=value)


def add(x, y):
    return Completed(data=x + y)


def add_upstream(upstream, y):
    """``upstream`` arrives as the upstream call's State."""
    return Completed(data=upstream.result() + y)


def fail_with(value="boom"):
    return Failed(data=ValueError(value), message="it failed")


def raise_exception(kind="ValueError", message="boom"):
    raise RAISABLE[kind](message)


async def async_raise_exception(kind="ValueError", message="boom"):
    raise_exception(kind, message)


def sleep_then_return(seconds, value=None):
    time.sleep(seconds)
    return Completed(data=value)


async def async_sleep_then_return(seconds, value=None):
    await anyio.sleep(seconds)
    return Completed(data=value)


def receive_states(states):
    """Completed with ``states`` as received: upstream futures in it arrive as States."""
    return Completed(data=states)


def meet(own_marker, other_marker, patience):
    """Leave ``own_marker``, then wait up to ``patience`` s for ``other_marker``.

    Completed(True) when the two calls overlapped in time.
    """
    pathlib.Path(own_marker).touch()
    return Completed(data=holds_within(lambda: os.path.exists(other_marker), patience))


def return_pid():
    return Completed(data=os.getpid())


def not_a_state(value=1):
    return value


def divide(a, b):
    return a / b


async def async_double(x):
    await anyio.sleep(0)
    return x * 2


def nap(seconds):
    time.sleep(seconds)
    return seconds


class CustomBaseException(BaseException):
    """Not an Exception: like KeyboardInterrupt, never re-raised by State.result()."""


class UnpicklableException(Exception):
    """Pickling this exception itself fails."""

    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


RAISABLE = {
    "ValueError": ValueError,
    "KeyError": KeyError,
    "RuntimeError": RuntimeError,
    "MemoryError": MemoryError,
    "RecursionError": RecursionError,
    "StopIteration": StopIteration,
    "GeneratorExit": GeneratorExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "SystemExit": SystemExit,
    "CustomBaseException": CustomBaseException,
    "UnpicklableException": UnpicklableException,
}


def misbehave(how, name="ValueError", message="fuzz"):
    """Fail in one of the ways a run_fn can: see tests/test_faults.py."""
    if how == "raise":
        raise RAISABLE[name](message)
    if how == "raise-unpicklable-args":
        raise ValueError(message, threading.Lock())
    if how == "return-unpicklable":
        return Completed(data=threading.Lock())
    if how == "return-non-state":
        return {"message": message}
    if how == "fail-with-unpicklable":
        return Failed(data=UnpicklableException(message), message="failed with an unpicklable exception")
    raise AssertionError(how)


async def async_misbehave(how, name="ValueError", message="fuzz"):
    await anyio.sleep(0)
    return misbehave(how, name, message)


def mark_then_nap(marker, seconds):
    """Write ``marker`` when the call starts, then sleep: a plain function for executors."""
    with open(marker, "w") as file:
        file.write(str(os.getpid()))
    time.sleep(seconds)
    return marker


def run_once_gate_opens(marker, gate, value=None):
    """Leave ``marker`` holding this process's pid, then return ``value`` once the file
    ``gate`` exists (the test's go-ahead)."""
    pathlib.Path(marker).write_text(str(os.getpid()))
    wait_for_path(gate, patience=150)
    return Completed(data=value)


def return_unpicklable():
    return Completed(data=threading.Lock())


@dataclasses.dataclass
class Box:
    """A value around ``item``: a dataclass for the collection visitor, and weakly
    referenceable, for the tests that a runner lets go of what it ran."""

    item: object = None


def read_snapshot(flat, nested, raw, box, with_future):
    """What a call saw of the mutable values it was given (see test_standard)."""
    return Completed(
        data=(flat[0], nested["n"][0], raw[0], box.item[0], with_future[0][0], with_future[1].result())
    )


def first_item(values):
    return values[0]
