"""Payloads of the large-value tests: a value that counts where it is unpickled."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

from taskrunners.states import Completed, State

#: Big enough to be shared at the default threshold (1 MiB).
LARGE = 2 << 20


class Counted:
    """A large value that notes, in ``path``, each process it is unpickled in."""

    def __init__(self, path: str, size: int = LARGE) -> None:
        self.path = path
        self.data = os.urandom(size)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        with open(self.path, "a") as file:
            file.write(f"{os.getpid()}\n")


def loads_by_process(path: str) -> Dict[int, int]:
    """How many times each process unpickled the values counted in ``path``."""
    counts: Dict[int, int] = {}
    if os.path.exists(path):
        with open(path) as file:
            for line in file:
                counts[int(line)] = counts.get(int(line), 0) + 1
    return counts


def size_of(value: Any, pause: float = 0.0) -> State:
    """The size of the Counted value (found directly, or nested in lists and dicts)."""
    time.sleep(pause)
    # By its attributes: on Ray the class may arrive by value twice, as two classes.
    while not hasattr(value, "path"):
        if isinstance(value, State):  # an upstream call's, given to a plain run_fn
            value = value.data
            continue
        value = value[0] if isinstance(value, (list, tuple)) else next(iter(value.values()))
    return Completed(data=(len(value.data), os.getpid()))


def make_counted(path: str) -> State:
    return Completed(data=Counted(path))


def array_info(array: Any) -> State:
    """The sum of ``array``, whether the worker could write to it, its process, and
    whether it is aligned (numpy computes on a misaligned array through slow paths)."""
    flags = array.flags
    return Completed(data=(float(array.sum()), bool(flags.writeable), os.getpid(), bool(flags.aligned)))


def write_to(array: Any) -> State:
    array[0] = -1.0
    return Completed(data=float(array[0]))


def same_object(value: Any, registry: List[Any]) -> State:
    return Completed(data=any(value is kept for kept in registry))
