"""A call of the Ray runner: what it holds until it is handed to Ray, and where Ray
then holds its State (its task's ref, and its place in its batch).

The runner (:mod:`~taskrunners._core.ray.runner`) makes these; the sending side
(:mod:`~taskrunners._core.ray.sending`) hands them to Ray and completes them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Mapping, NamedTuple, Optional, Sequence

from taskrunners._core.batching import Dispatcher, OwnEntry, Sendable, batch_key_of, group_of
from taskrunners._core.calls import Call, cancelled_state
from taskrunners._core.ray.worker import Unbatched
from taskrunners._core.futures import TaskRun
from taskrunners.states import Crashed, State


class Held(NamedTuple):
    """Where an upstream call's State is held in Ray: its task's ref, and its place there."""

    ref: Any
    #: Its place among the outcomes of a batch; None for a ref holding one packed State.
    position: Optional[int]
    #: Whether that one State holds a large value: the worker then fetches it from the
    #: ref once, for every call there that takes it (see ``ray.worker``).
    large: bool = False


class RayCall(Call, OwnEntry):
    """One call: gathered or waiting here until it is handed to Ray, then in a Ray task.

    Until it is done, it also holds what goes to Ray (a batch whose worker died sends
    its unstarted calls again); then it lets go of it.
    """

    __slots__ = (
        "runner", "dispatcher", "task_run", "run_fn", "run_kwargs", "held", "options", "ref", "position",
        "failed", "key", "group",
    )

    def __init__(
        self,
        runner: object,
        dispatcher: Optional[Dispatcher[Any]],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        options: Mapping[str, Any],
    ) -> None:
        Call.__init__(self)
        #: The runner that made the call: only told apart from other runners by ``is``.
        self.runner = runner
        #: The dispatcher of the runner's start() block, which the call waits in until
        #: it is sent; None once the call is done (or if the runner was not started).
        self.dispatcher = dispatcher
        self.task_run = task_run
        self.run_fn: Optional[Callable[..., Any]] = run_fn
        self.run_kwargs: Optional[Dict[str, Any]] = run_kwargs
        #: Where Ray holds the upstream States its ``Upstream(n)`` placeholders stand for.
        self.held: Sequence[Held] = ()
        #: The call's own remote options, from :func:`ray_options`.
        self.options = options
        #: The ref of the Ray task carrying the call, and the call's place in its batch.
        self.ref: Any = None
        self.position: Optional[int] = None
        # Whether Ray failed the task (the worker died, cancelled, ...): its ref holds no State.
        self.failed = False
        # The call is its own entry for the dispatcher (see entry_of).
        self.key: Hashable = None
        self.group: Hashable = None

    def _ended(self) -> None:
        # A settled call keeps no argument or function (its key) alive.
        self.run_fn = self.run_kwargs = self.key = self.group = self.dispatcher = None
        self.held = ()

    def expedite(self) -> None:
        dispatcher = self.dispatcher
        if dispatcher is not None and not self.done():
            dispatcher.expedite(self)

    def stop(self) -> Any:
        """End the call as cancelled (leaving the block); the ref to cancel in Ray, if any."""
        if self.cancel() or self.done():
            return None
        self.failed = True
        self.set_result(cancelled_state())
        return self.ref


#: What the dispatcher holds: a call (its own entry), or an Entry for a call sent again.
RayEntry = Sendable[None]


def entry_of(call: RayCall) -> RayCall:
    """The call as the dispatcher's entry: grouped by its task and its own options."""
    key = batch_key_of(call.run_fn, call.run_kwargs)  # type: ignore[arg-type]
    try:
        hash(key)
    except TypeError:  # a task that cannot be a key: its calls are never batched
        key = Unbatched(call.run_fn)  # type: ignore[arg-type]
    options = call.options
    call.key = key
    call.group = group_of(
        key, tuple(sorted((name, repr(value)) for name, value in options.items())) if options else None
    )
    return call


def stopped_state(call: Any) -> State:
    error = RuntimeError(
        f"The Ray task runner stopped before call {call.task_run.name!r} could be sent to Ray."
    )
    return Crashed(message=str(error), data=error)
