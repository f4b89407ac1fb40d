"""One generation of the Parallel runner's pool: a loky executor and its slot table.

A pool whose worker dies is broken for good (loky kills its other workers too), so
the runner's pool is a succession of generations: when one breaks, the next batch
handed over starts a fresh one. A generation knows what it needs to say, call by
call, what became of the calls it held: which worker started or finished each one
(its slot table, :mod:`~taskrunners._core.remote.slots`), what broke it, and which workers
died on their own and how.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple

import loky

from taskrunners._core.parallel import loky_private
from taskrunners._core.parallel.calls import Batch
from taskrunners._core.parallel.crashes import pool_cause
from taskrunners._core.parallel.worker import (
    INITIALIZER_ERROR_FILE,
    initialize_worker,
    run_batch_call,
)
from taskrunners._core.remote.slots import SlotTable

__all__ = ["Generation"]


class Generation:
    """One loky executor, and the slot table its workers mark calls in.

    :param batches: how many batches loky may hold at once, and
    :param batch_size: the most calls a batch may have: the slot table has a run of
        slots for each batch loky holds, so it never runs out
    """

    def __init__(
        self,
        number: int,
        directory: str,
        max_workers: int,
        batches: int,
        batch_size: int,
        initializer: Optional[Callable[..., Any]],
        initargs: Tuple[Any, ...],
        env: Optional[Dict[str, str]],
    ) -> None:
        self.number = number
        self.slots = SlotTable(os.path.join(directory, f"slots-{number}"), batches, batch_size)
        self.executor = loky.ProcessPoolExecutor(
            max_workers=max_workers,
            initializer=initialize_worker,
            initargs=(
                os.getpid(),
                os.path.join(directory, INITIALIZER_ERROR_FILE),
                initializer,
                initargs,
            ),
            env=env,
        )
        self._lock = threading.Lock()
        # What broke the pool, and the exit codes of the workers that died on their
        # own (by pid), once known.
        self.broken: Optional[BaseException] = None
        self.dead: Optional[Dict[int, Optional[int]]] = None

    def submit(
        self, batch: Batch, log_level: int, on_manager: bool = False
    ) -> Tuple["concurrent.futures.Future[Optional[bytes]]", range]:
        """Hand ``batch`` to loky, a slot per call; its loky future, and the slots.

        :param on_manager: True on this executor's manager thread, inside a callback
        :raises: what loky's ``submit`` raises (the slots are then given back)
        """
        slots = self.slots.take(len(batch.entries))
        if slots is None:
            raise RuntimeError(
                f"The slot table of the process pool has no room for a batch of "
                f"{len(batch.entries)} calls; this is a bug in taskrunners."
            )
        try:
            with loky_private.no_wakeup(self.executor) if on_manager else contextlib.nullcontext():
                submitted = self.executor.submit(
                    run_batch_call, batch.payload, batch.names, self.slots.path, slots, log_level
                )
        except BaseException:
            self.give_back(slots)
            raise
        return submitted, slots

    def give_back(self, slots: range) -> None:
        """No worker writes to these slots any more (their batch came back, or never went)."""
        self.slots.give_back(slots)

    def marks(self, slot: int) -> Tuple[int, int]:
        """(pid that started the call in ``slot``, pid that finished it), 0 for not yet."""
        return self.slots.marks(slot)

    def broke(self, error: BaseException) -> None:
        """The executor broke with ``error`` (its ``submit`` said so): note it.

        Which workers died is left to :meth:`broke_under`: loky may already have
        killed the survivors here, which would then pass for workers that died on
        their own.
        """
        with self._lock:
            self.broken = self.broken or error

    def broke_under(self, error: BaseException) -> None:
        """A batch came back with ``error``: note it, and which workers died on their own.

        Called from the callbacks of a break, the first of which finds the dead
        workers before loky kills the survivors (see ``loky_private.stopped_workers``).
        """
        with self._lock:
            self.broken = self.broken or error
            if self.dead is None:
                self.dead = loky_private.stopped_workers(self.executor)

    def cause(self) -> str:
        """Which workers died and how, for messages."""
        return pool_cause(self.dead, self.broken)

    def shutdown(self, kill_workers: bool) -> None:
        """Join loky's manager thread, which joins (or first kills) the workers."""
        self.executor.shutdown(wait=True, kill_workers=kill_workers)

    def close(self) -> None:
        """Release the slot table (the executor is shut down)."""
        self.slots.close()
