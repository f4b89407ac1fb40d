"""One worker of the Parallel runner's pool: a loky executor of one process.

loky stops a whole executor when one of its workers dies, killing the others; so the
runner's pool gives each worker an executor of its own, and a death (or a recycling)
ends that one only. A worker place of the pool is held by a succession of these
generations: when one breaks, or retires (it ran ``max_calls_per_worker`` calls, or
its resident memory went above ``worker_memory_limit``), the next batch for that place
starts a fresh one. A generation knows what it needs to say, call by call, what became
of the calls it held: what broke it, and how its worker died; which calls started or
finished is in the pool's slot table (:mod:`~taskrunners._core.remote.slots`).
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
from taskrunners._core.remote.slots import TIMED_OUT_EXIT_CODE, SlotTable

__all__ = ["Generation"]


class Generation:
    """One worker process in a loky executor of its own.

    :param slots: the pool's slot table, which the worker marks calls in
    :param max_calls: how many calls it may run (``max_calls_per_worker``), or None
    :param memory_limit: ``worker_memory_limit`` in bytes, or None
    """

    def __init__(
        self,
        number: int,
        directory: str,
        slots: SlotTable,
        max_calls: Optional[int],
        memory_limit: Optional[int],
        initializer: Optional[Callable[..., Any]],
        initargs: Tuple[Any, ...],
        env: Optional[Dict[str, str]],
    ) -> None:
        self.number = number
        self.slots = slots
        self.executor = loky.ProcessPoolExecutor(
            max_workers=1,
            initializer=initialize_worker,
            initargs=(
                os.getpid(),
                os.path.join(directory, INITIALIZER_ERROR_FILE),
                initializer,
                initargs,
            ),
            env=env,
        )
        self._memory_limit = memory_limit
        self._lock = threading.Lock()
        #: Calls it may still be handed, or None for no limit.
        self.calls_left = max_calls
        #: Why it takes no other batch though it works (it is replaced once its
        #: batches are back): "calls", "memory", or None.
        self.retiring: Optional[str] = None
        # What broke it, and the exit code of its worker if it died on its own (by
        # pid), once known.
        self.broken: Optional[BaseException] = None
        self.dead: Optional[Dict[int, Optional[int]]] = None
        self._manager: Optional[threading.Thread] = None

    def submit(
        self, batch: Batch, log_level: int, on_manager: bool = False
    ) -> Tuple["concurrent.futures.Future[Tuple[Optional[bytes], int]]", range]:
        """Hand ``batch`` to loky, a slot per call; its loky future, and the slots.

        It counts against :attr:`calls_left`, and retires the worker at 0.

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
                    run_batch_call,
                    batch.payload,
                    batch.names,
                    self.slots.path,
                    slots,
                    log_level,
                    self._memory_limit,
                )
        except BaseException:
            self.give_back(slots)
            raise
        if self.calls_left is not None:
            self.calls_left -= len(batch.entries)
            if self.calls_left <= 0:
                self.retiring = "calls"
        return submitted, slots

    def takes(self, calls: int) -> bool:
        """Whether it works and may be handed a batch of ``calls`` more calls."""
        return (
            self.broken is None
            and self.retiring is None
            and (self.calls_left is None or self.calls_left >= calls)
        )

    def over_memory(self) -> None:
        """Its worker's resident memory went above the limit: it takes no other batch."""
        self.retiring = self.retiring or "memory"

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

    def timed_out(self) -> bool:
        """Whether its worker ended itself because a call went past its time limit."""
        return TIMED_OUT_EXIT_CODE in (self.dead or {}).values()

    def cause(self) -> str:
        """Which workers died and how, for messages."""
        return pool_cause(self.dead, self.broken)

    def retire(self, kill_workers: bool = False) -> None:
        """Let the worker exit once its batches are done (or kill it), without waiting."""
        self._manager = self._manager or loky_private.manager_thread(self.executor)
        self.executor.shutdown(wait=False, kill_workers=kill_workers)

    def retired(self) -> bool:
        """Whether, once retired, its worker and loky's manager thread are gone."""
        return self._manager is None or not self._manager.is_alive()

    def join(self) -> None:
        """Wait for loky's manager thread (retired), which joins (or first kills) the worker."""
        if self._manager is not None:
            self._manager.join()
        else:  # loky lacks what manager_thread reads
            self.executor.shutdown(wait=True)
