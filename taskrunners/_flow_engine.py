"""The flow engine: flow runs, their arguments, and the runner each flow call starts.

- :class:`FlowRun` and :data:`current_flow_run`: the run of the flow whose body is
  running in this context; a task called there is submitted to its runner.
- :func:`mark_inputs` and :func:`resolve_inputs`: futures in a task's or a subflow's
  arguments become ``Upstream(run_id)`` markers on the way in (the futures travel
  apart, for the runner to swap for their States) and their data on the way out, or
  a NotReady state when one did not complete.
- :func:`checked_runner`, :func:`runner_for_call`, :func:`fresh_copy`: which runner a
  flow call starts.
- :class:`Decorated`: what a task and a flow share.

:mod:`taskrunners.tasks`, :mod:`taskrunners._task_runs` and :mod:`taskrunners.flows`
build on this module, which knows none of them; runners are reached only through
:mod:`taskrunners._core.seam`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import threading
import uuid
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, Set, Tuple, Type, Union, cast

from typing_extensions import ParamSpec

from taskrunners._collections import visit_collection
from taskrunners._core import seam
from taskrunners._core.seam import FLAT_TYPES, BlockingTaskRunner, Upstream
from taskrunners.futures import PrefectFuture, TaskRun
from taskrunners.states import Pending, State
from taskrunners.task_runners import BaseTaskRunner, _FacadeRunner

__all__ = [
    "RunnerSpec",
    "FlowRun",
    "current_flow_run",
    "Decorated",
    "mark_inputs",
    "resolve_inputs",
    "checked_runner",
    "runner_for_call",
    "fresh_copy",
]

P = ParamSpec("P")

#: What a flow's ``task_runner`` may be: a runner, or a runner class to instantiate.
RunnerSpec = Union[BaseTaskRunner, BlockingTaskRunner, Type[BaseTaskRunner], Type[BlockingTaskRunner]]

_RUNNER_CLASSES = (_FacadeRunner, BlockingTaskRunner)


# -- the flow run and its context --------------------------------------------------------


class FlowRun:
    """One call of a flow: the started runner its task calls go to.

    A sync flow drives the blocking ``core`` alone; an async flow also has the
    ``facade`` over it, which an awaited task call goes through. ``asynchronous``
    says which: whether the run's futures are awaited.
    """

    __slots__ = ("core", "facade", "asynchronous", "_numbers")

    def __init__(self, core: BlockingTaskRunner, facade: Optional[BaseTaskRunner] = None) -> None:
        self.core = core
        self.facade = facade
        self.asynchronous = facade is not None
        self._numbers: Dict[str, Iterator[int]] = {}

    def new_task_run(self, task_name: str) -> TaskRun:
        """The next run of the task named ``task_name``: ``"<name>-<n>"``, from 0."""
        return TaskRun(name=f"{task_name}-{next(self._numbers_of(task_name))}")

    def new_task_runs(self, task_name: str, count: int) -> List[TaskRun]:
        """The next ``count`` runs of the task named ``task_name``, numbered in a row."""
        # islice takes its numbers from the counter in one go (in C, holding the GIL):
        # they follow each other, and runs named from another thread get others.
        taken = list(itertools.islice(self._numbers_of(task_name), count))
        return seam.numbered_runs(task_name, taken[0], count) if taken else []

    def _numbers_of(self, task_name: str) -> Iterator[int]:
        numbers = self._numbers.get(task_name)
        if numbers is None:  # setdefault: another thread may have made it meanwhile
            numbers = self._numbers.setdefault(task_name, itertools.count())
        return numbers

    def submit(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> PrefectFuture[Any]:
        """Submit without awaiting: a plain task anywhere, or any task in a sync flow."""
        # A plain run_fn goes to the blocking core whatever the facade does, so it can
        # be submitted from this synchronous call.
        return seam.submit(self.core, task_run, run_fn, run_kwargs, self.facade, self.asynchronous)

    def submit_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
        memo: Optional[seam.Memo] = None,
    ) -> List[PrefectFuture[Any]]:
        """Submit many runs of one task at once (``task.map``), without awaiting; the
        parts of one map share a ``memo`` (see ``seam.submit_many``)."""
        return seam.submit_many(
            self.core, task_runs, run_fn, run_kwargs_list, self.facade, self.asynchronous, memo
        )

    async def submit_async(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> PrefectFuture[Any]:
        """Submit through the facade: an async task in an async flow."""
        assert self.facade is not None, "only an async flow's run awaits a submission"
        return await self.facade.submit(task_run, run_fn, run_kwargs)


#: The run of the flow whose body is running in this context; None outside a flow,
#: and inside a task body (a task called there is a plain call).
current_flow_run: contextvars.ContextVar[Optional[FlowRun]] = contextvars.ContextVar(
    "taskrunners_flow_run", default=None
)


# -- what a task and a flow share ---------------------------------------------------------


class Decorated(Generic[P]):
    """A function made a task or a flow: its name, and its arguments checked at the call."""

    #: "Task" or "Flow", for messages.
    kind = "Function"

    def __init__(self, fn: Callable[P, Any], name: Optional[str]) -> None:
        if not callable(fn):
            raise TypeError(
                f"@{self.kind.lower()} needs a function, got {type(fn).__name__}: {fn!r}."
            )
        self.fn = fn
        self.name: str = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self.isasync = inspect.iscoroutinefunction(fn)
        self._signature: Optional[inspect.Signature] = None
        functools.update_wrapper(cast(Callable[..., Any], self), fn)  # a Task or a Flow

    def __getstate__(self) -> Dict[str, Any]:
        data = self.__dict__.copy()
        data["_signature"] = None  # annotations need not pickle
        return data

    def _check_arguments(self, args: tuple, kwargs: dict) -> None:
        """Raise the TypeError the function would, naming the task or flow, before submitting."""
        signature = self._signature
        if signature is None:
            try:
                signature = self._signature = inspect.signature(self.fn)
            except (TypeError, ValueError):  # a builtin without a signature: the call decides
                return
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.kind} {self.name!r}: {exc}") from None


# -- arguments: futures and states in, data out -------------------------------------------


def mark_inputs(
    args: tuple, kwargs: dict
) -> Tuple[tuple, dict, Optional[Dict[uuid.UUID, PrefectFuture[Any]]], bool]:
    """Swap futures in the arguments for ``Upstream(run_id)`` markers.

    :return: the arguments, the futures by run id (None if there were neither
        futures nor States to resolve), and whether every argument is a plain number,
        string or None
    """
    if not kwargs and len(args) == 1:  # the common case of task.map: one argument
        if type(args[0]) in FLAT_TYPES:
            return args, kwargs, None, True
    elif FLAT_TYPES.issuperset(map(type, args)) and FLAT_TYPES.issuperset(map(type, kwargs.values())):
        return args, kwargs, None, True  # nothing to walk
    upstream: Dict[uuid.UUID, PrefectFuture[Any]] = {}
    found_state = False

    def mark(value: Any) -> Any:
        nonlocal found_state
        if isinstance(value, PrefectFuture):
            upstream[value.run_id] = value
            return Upstream(value.run_id)
        if isinstance(value, State):
            found_state = True
        return value

    args = visit_collection(args, mark)
    kwargs = visit_collection(kwargs, mark)
    return args, kwargs, (upstream if upstream or found_state else None), False


def resolve_inputs(
    args: tuple, kwargs: dict, upstream: Dict[uuid.UUID, State[Any]]
) -> Tuple[tuple, dict, Optional[State[Any]]]:
    """Swap markers and States for their data; a NotReady state if one did not complete."""
    not_ready: List[State[Any]] = []

    def resolve(value: Any) -> Any:
        run_id: Optional[uuid.UUID]
        if type(value) is Upstream:
            run_id = cast(uuid.UUID, value.key)
            state = upstream[run_id]
        elif isinstance(value, State):
            state, run_id = value, None
        else:
            return value
        if state.is_completed():
            return state.data
        if not not_ready:
            named = f"task run '{run_id}'" if run_id is not None else f"state {state!r}"
            not_ready.append(
                Pending(
                    name="NotReady",
                    message=f"Upstream {named} did not reach a 'COMPLETED' state.",
                )
            )
        return None

    args = visit_collection(args, resolve)
    kwargs = visit_collection(kwargs, resolve)
    return args, kwargs, (not_ready[0] if not_ready else None)


# -- the runner a flow call starts ----------------------------------------------------------


def checked_runner(runner: Any, flow_name: str) -> RunnerSpec:
    """``runner`` if it is one of taskrunners' runners or runner classes.

    :raises TypeError: naming the flow, the value and what to pass instead
    """
    if isinstance(runner, type):
        if issubclass(runner, _RUNNER_CLASSES):
            return runner
    elif isinstance(runner, _RUNNER_CLASSES):
        return runner
    raise TypeError(
        f"Flow {flow_name!r}: `task_runner` must be one of taskrunners' runners, e.g. "
        f"taskrunners.ConcurrentTaskRunner() or the class itself, got {runner!r}."
    )


_claims_lock = threading.Lock()
_claimed: Set[int] = set()


@contextlib.contextmanager
def runner_for_call(configured: RunnerSpec) -> Iterator[Any]:
    """The runner one flow call starts: the configured one, or a copy if it is in use."""
    if isinstance(configured, type):
        yield configured()
        return
    key = id(configured)
    with _claims_lock:
        free = key not in _claimed and not (
            configured.is_started or seam.core_of(configured).is_started
        )
        if free:
            _claimed.add(key)
    if not free:
        # A subflow given its parent's runner, or one flow called from two threads.
        yield fresh_copy(configured)
        return
    try:
        yield configured
    finally:
        with _claims_lock:
            _claimed.discard(key)


def fresh_copy(runner: Any) -> Any:
    """A new, unstarted runner of the same class with the same settings.

    Every runner class keeps each constructor argument under its own name (the
    facade as a read-only property).

    :raises RuntimeError: if a setting cannot be read back
    """
    try:
        settings = {
            parameter.name: getattr(runner, parameter.name)
            for parameter in inspect.signature(type(runner)).parameters.values()
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        }
        return type(runner)(**settings)
    except Exception as exc:  # a setting the runner does not keep under its own name
        raise RuntimeError(
            f"The task runner {runner} is in use by another flow run and could not be "
            f"copied ({type(exc).__name__}: {exc}); give this flow its own runner, e.g. "
            f"@flow(task_runner={type(runner).__name__}(...)), or pass the class."
        ) from exc
