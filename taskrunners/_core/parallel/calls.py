"""What the Parallel runner's pool sends: call handles, and batches pickled together.

- :class:`ParallelCall`, the handle of one call: its State once done; its ``run_fn``
  and arguments until then (dropped once it is settled, so a finished call keeps
  nothing alive), and how often a pool took it, for worker deaths; it is its own
  entry for the dispatcher (a ``Sendable``).
- :class:`Batch`, the calls of one loky task: :func:`pack` marks them running and
  pickles them together, once, so that what they share (the run_fn, a flow's task)
  is pickled once; a call that cannot be pickled is Crashed alone and the others go
  on without it.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import cloudpickle

from taskrunners._core.batching import Dispatcher, OwnEntry, Sendable, batch_key_of
from taskrunners._core.calls import Call
from taskrunners._core.parallel.crashes import pickling_failure
from taskrunners._core.futures import TaskRun
from taskrunners.states import State

__all__ = ["ParallelCall", "Batch", "pack"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class ParallelCall(Call, OwnEntry):
    """One call on its way through the pool; its result is the call's State.

    As a ProcessPoolExecutor future: it can be cancelled while it is gathered, and
    is running from the moment its batch is sent until it is done (also while it is
    gathered again after a break, as it cannot be withdrawn from the broken pool
    before loky gives it back).
    """

    __slots__ = ("task_run", "run_fn", "run_kwargs", "handovers", "key", "_dispatcher")

    def __init__(
        self,
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        dispatcher: "Dispatcher[Sendable[None]]",
        key: Hashable = None,
    ) -> None:
        Call.__init__(self)
        self.task_run = task_run
        self.run_fn: Optional[Callable[..., Any]] = run_fn
        self.run_kwargs: Optional[Dict[str, Any]] = run_kwargs
        #: How many pools were handed the call; one that broke may have to retry it.
        self.handovers = 0
        # The call is its own entry for the dispatcher (a Sendable): its task, which is
        # its group (``key``: batch_key_of(run_fn, run_kwargs), if the caller has it).
        self.key = batch_key_of(run_fn, run_kwargs) if key is None else key
        self._dispatcher: Optional["Dispatcher[Sendable[None]]"] = dispatcher

    @property
    def group(self) -> Hashable:
        """The call's group for the dispatcher: its task (no options on this runner)."""
        return self.key

    def _ended(self) -> None:
        # A settled call, cancelled ones too, keeps no argument, function (its key: the
        # run_fn, or the flow's task) or pool alive.
        self.run_fn = self.run_kwargs = self._dispatcher = self.key = None

    def expedite(self) -> None:
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.expedite(self)


class Batch:
    """Calls that travel as one loky task: their entries, names, and pickled calls."""

    __slots__ = ("entries", "names", "payload")

    def __init__(self, entries: List[Sendable[None]], payload: bytes) -> None:
        self.entries = entries
        self.names = [entry.call.task_run.name for entry in entries]
        self.payload = payload

    def settle(self, state_of: Callable[[str], State]) -> None:
        """Give each call the State ``state_of(its task run's name)``."""
        for entry, name in zip(self.entries, self.names):
            entry.call.set_result(state_of(name))

    def cancel(self) -> None:
        """End each call as cancelled: none of them started."""
        for entry in self.entries:
            entry.call.set_cancelled()


def pack(entries: List[Sendable[None]]) -> Optional[Batch]:
    """Mark the calls running and pickle them together; None if none is left to send.

    A call cancelled meanwhile is left out. If the batch cannot be pickled, its calls
    are pickled one by one: each that fails alone is Crashed with its pickling error.
    """
    entries = [entry for entry in entries if entry.call.set_running()]
    if not entries:
        return None
    try:
        return Batch(entries, _dumps(entries))
    except Exception:
        pass
    kept = []
    for entry in entries:
        call = entry.call
        try:
            cloudpickle.dumps((call.run_fn, call.run_kwargs), _PROTOCOL)
        except Exception as exc:
            call.set_result(pickling_failure(call.task_run, call.run_fn, exc))
        else:
            kept.append(entry)
    if not kept:
        return None
    try:
        return Batch(kept, _dumps(kept))
    except Exception as exc:  # each pickles alone, not together
        for entry in kept:
            call = entry.call
            call.set_result(pickling_failure(call.task_run, call.run_fn, exc))
        return None


def _dumps(entries: List[Sendable[None]]) -> bytes:
    # What parallel.worker.run_batch_call unpickles: ([run_fn, ...], [run_kwargs, ...]).
    calls = [entry.call for entry in entries]
    with io.BytesIO() as file:
        pickler = _Pickler(file, protocol=_PROTOCOL)
        pickler.dump(([call.run_fn for call in calls], [call.run_kwargs for call in calls]))
        return file.getvalue()


_reducers_made: Tuple[int, Dict[Any, Any]] = (-1, {})


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, with its table of reducers by type as one plain dict.

    cloudpickle keeps it as a ChainMap over ``copyreg``'s, which the C pickler looks
    up in Python for every object of a class, and a plain dict in C: a call's
    arguments (a flow's task run) pickle faster. Made again if ``copyreg`` gained a type.
    """

    @property
    def dispatch_table(self) -> Dict[Any, Any]:  # read once, when the pickler is made
        global _reducers_made
        size, table = _reducers_made
        if size != len(copyreg.dispatch_table):
            size = len(copyreg.dispatch_table)
            table = dict(cloudpickle.Pickler.dispatch_table)
            _reducers_made = (size, table)
        return table
