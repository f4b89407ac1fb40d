"""Functions for ``RunnerExecutor.map`` tests, importable by worker processes."""

from __future__ import annotations

import os
import threading
import time


def identity(value):
    return value


def where(value):
    """The process and thread that ran this item."""
    return os.getpid(), threading.get_ident()


def fail_at(value, bad):
    if value == bad:
        raise ValueError(value)
    return value


def record_call(directory, value, seconds=0.0):
    """Leave a file named after ``value`` in ``directory`` (one per call), then sleep."""
    with open(os.path.join(directory, str(value)), "w") as file:
        file.write(str(os.getpid()))
    time.sleep(seconds)
    return value


def calls_recorded(directory):
    """The values whose call ran, from :func:`record_call`'s files."""
    return sorted(int(name) for name in os.listdir(directory))
