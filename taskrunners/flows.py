"""Flows: ``@flow`` and :class:`Flow`, run by a small in-process engine with no server.

Calling a flow starts its task runner, runs the body, waits for every task the body
submitted and returns the flow's :class:`~taskrunners.states.State`. Inside a flow,
calling a task submits it to the flow's runner and returns a
:class:`~taskrunners.futures.PrefectFuture`; outside a flow, a task call is a plain
function call.

>>> from taskrunners import SequentialTaskRunner, flow, task
>>> @task
... def say_hello(name):
...     print(f"hello {name}")
>>> @flow(task_runner=SequentialTaskRunner())
... def greetings(names):
...     for name in names:
...         say_hello(name)
>>> greetings(["arthur", "trillian"]).is_completed()
hello arthur
hello trillian
True

A synchronous flow drives the blocking twin of its runner (:mod:`taskrunners.sync`),
so it needs no event loop; an async flow drives the async facade on the caller's
asyncio or trio loop. Tasks live in :mod:`taskrunners.tasks`, the engine both share
in :mod:`taskrunners._flow_engine`; ``wait`` and ``as_completed`` beside the futures,
in :mod:`taskrunners.futures`. This module exports them all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import (
    Any,
    Callable,
    ContextManager,
    Coroutine,
    Generic,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
    cast,
    overload,
)

import anyio
from typing_extensions import ParamSpec, Protocol

from taskrunners._collections import iter_leaves
from taskrunners._core import seam
from taskrunners._core.seam import BlockingTaskRunner, in_event_loop
from taskrunners._flow_engine import (
    Decorated,
    FlowRun,
    RunnerSpec,
    checked_runner,
    current_flow_run,
    mark_inputs,
    resolve_inputs,
    runner_for_call,
)
from taskrunners.futures import DoneAndNotDone, as_completed, wait
from taskrunners.states import Completed, Crashed, Failed, State
from taskrunners.task_runners import ConcurrentTaskRunner
from taskrunners.tasks import Task, task, unmapped

__all__ = ["Flow", "Task", "flow", "task", "unmapped", "wait", "as_completed", "DoneAndNotDone"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: What calling an async flow returns: a coroutine giving the flow's State.
StateCoroutine = Coroutine[Any, Any, State[Any]]

flow_logger = logging.getLogger("taskrunners.flow")


class Flow(Decorated[P], Generic[P, R]):
    """A function whose task calls run on a task runner; made by :func:`flow`.

    Type checkers see a flow's parameters (``P``) as its function's, and ``R`` as
    what calling it returns: a ``State`` of the function's return type, or for an
    async flow a coroutine giving one.

    :param fn: the function, plain or ``async``
    :param name: the flow's name; defaults to the function's name
    :param task_runner: a runner instance or class; None for ``ConcurrentTaskRunner()``
    :param timeout_seconds: the most seconds a call of the flow may run; past it the
        body is interrupted, its task runs are stopped as when the body raises, and
        the flow's State is Failed, named "TimedOut". None: no limit
    :raises TypeError: if ``fn`` is not callable, ``task_runner`` is not a runner, or
        ``timeout_seconds`` is not a number
    :raises ValueError: if ``timeout_seconds`` is not positive

    ``task_runner`` may be reassigned (``my_flow.task_runner = DaskTaskRunner()``).
    Each call starts the runner for its own duration; when the instance is already in
    use (a subflow given its parent's runner, calls from two threads), the call starts
    a new runner of the same class with the same settings.
    """

    kind = "Flow"

    @overload
    def __init__(
        self: Flow[P, Coroutine[Any, Any, State[T]]],
        fn: Callable[P, Coroutine[Any, Any, T]],
        name: Optional[str] = None,
        task_runner: Optional[RunnerSpec] = None,
        timeout_seconds: Optional[float] = None,
    ) -> None: ...

    @overload
    def __init__(
        self: Flow[P, State[T]],
        fn: Callable[P, T],
        name: Optional[str] = None,
        task_runner: Optional[RunnerSpec] = None,
        timeout_seconds: Optional[float] = None,
    ) -> None: ...

    def __init__(
        self,
        fn: Callable[P, Any],
        name: Optional[str] = None,
        task_runner: Optional[RunnerSpec] = None,
        timeout_seconds: Optional[float] = None,
    ) -> None:
        super().__init__(fn, name)
        self.task_runner = task_runner if task_runner is not None else ConcurrentTaskRunner()
        self.timeout_seconds = seam.check_timeout(timeout_seconds, "timeout_seconds")

    @property
    def task_runner(self) -> RunnerSpec:
        """The runner (or runner class) each call of this flow starts."""
        return self._task_runner

    @task_runner.setter
    def task_runner(self, runner: RunnerSpec) -> None:
        self._task_runner = checked_runner(runner, self.name)

    def __repr__(self) -> str:
        return f"Flow(name={self.name!r}, task_runner={self._task_runner!r})"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the flow; returns its State (a coroutine giving it, for an async flow).

        Futures and States in the arguments (from a parent flow) reach the body as their
        data; if one did not complete, the body does not run and the State is
        ``Pending(name="NotReady")``.
        """
        self._check_arguments(args, kwargs)
        if self.isasync:
            return cast(R, self._run_async(args, kwargs))
        return cast(R, self._run_blocking(args, kwargs))

    def _run_blocking(self, args: tuple, kwargs: dict) -> State[Any]:
        args, kwargs, not_ready = self._inputs_blocking(args, kwargs)
        if not_ready is not None:
            return not_ready
        failure: Optional[State[Any]] = None
        value: Any = None
        with runner_for_call(self._task_runner) as runner:
            core = seam.core_of(runner)
            token = current_flow_run.set(FlowRun(core))
            try:
                flow_logger.debug("Flow run %r: starting on %s.", self.name, core)
                with core.start(), _from_body():
                    with self._time_limit(core) as fired:
                        value = self.fn(*args, **kwargs)
                    if fired:  # the interruption landed in a task run's body instead
                        raise seam.CallTimedOut
            except _BodyRaised as raised:
                failure = self._failed(raised.exc)
            except seam.CallTimedOut:
                failure = self._timed_out()
            finally:
                current_flow_run.reset(token)
        if failure is not None:
            return failure
        return self._final_state(seam.states_when_done(value, core))

    async def _run_async(self, args: tuple, kwargs: dict) -> State[Any]:
        args, kwargs, not_ready = await self._inputs_async(args, kwargs)
        if not_ready is not None:
            return not_ready
        failure: Optional[State[Any]] = None
        value: Any = None
        with runner_for_call(self._task_runner) as runner:
            if isinstance(runner, BlockingTaskRunner):
                raise TypeError(
                    f"Flow {self.name!r} is async and needs an async runner: use "
                    f"taskrunners.{type(runner).__name__}(...) rather than the blocking "
                    f"taskrunners.sync.{type(runner).__name__}(...)."
                )
            core = seam.core_of(runner)
            token = current_flow_run.set(FlowRun(core, runner))
            try:
                flow_logger.debug("Flow run %r: starting on %s.", self.name, runner)
                async with runner.start():
                    with _from_body():
                        if self.timeout_seconds is None:
                            value = await self.fn(*args, **kwargs)
                        else:
                            with anyio.move_on_after(self.timeout_seconds) as scope:
                                value = await self.fn(*args, **kwargs)
                            if scope.cancel_called:
                                # Left as an exception leaves it: task runs stopped.
                                raise seam.CallTimedOut
            except _BodyRaised as raised:
                failure = self._failed(raised.exc)
            except seam.CallTimedOut:
                failure = self._timed_out()
            finally:
                current_flow_run.reset(token)
        # A runner may have turned a cancellation into a Crashed task run (Prefect 2's
        # Sequential runner does): the flow must not complete as if nothing happened.
        await anyio.lowlevel.checkpoint_if_cancelled()
        if failure is not None:
            return failure
        return self._final_state(await seam.astates_when_done(value, core))

    def _time_limit(self, core: BlockingTaskRunner) -> ContextManager[List[bool]]:
        """Interrupts the body of a sync flow at its limit (CallTimedOut), its task runs
        ended first, so that a body waiting for one goes on to the interruption."""
        seconds = self.timeout_seconds
        if seconds is None:
            return contextlib.nullcontext([])
        stopped = Crashed(
            message=f"Flow run {self.name!r} timed out after {seconds:g} s: this task run was stopped.",
            data=TimeoutError(f"flow run {self.name!r} timed out"),
        )
        return seam.time_limit(seconds, lambda: seam.stop_running(core, stopped))

    def _timed_out(self) -> State[Any]:
        assert self.timeout_seconds is not None
        state = seam.timed_out_state(self.name, self.timeout_seconds, kind="Flow run")
        flow_logger.error(state.message)
        return state

    def _failed(self, exc: Exception) -> State[Any]:
        message = f"Flow run {self.name!r} raised {type(exc).__name__}: {exc}"
        flow_logger.error(message)
        return Failed(data=exc, message=message)

    def _final_state(self, value: Any) -> State[Any]:
        states = list(iter_leaves(value, _is_state))
        unfinished = sum(1 for state in states if not state.is_completed())
        if unfinished:
            return Failed(
                data=value,
                message=f"{unfinished}/{len(states)} states returned by flow run "
                f"{self.name!r} did not complete.",
            )
        return Completed(data=value)

    def _inputs_blocking(
        self, args: tuple, kwargs: dict
    ) -> Tuple[tuple, dict, Optional[State[Any]]]:
        args, kwargs, upstream, _ = mark_inputs(args, kwargs)
        if upstream is None:
            return args, kwargs, None
        unfinished = [f for f in upstream.values() if not seam.call_of(f).done()]
        if unfinished and in_event_loop() and any(f.asynchronous for f in unfinished):
            # Their calls may need this very event loop to finish.
            raise RuntimeError(
                f"Flow {self.name!r} is synchronous and was given unfinished asynchronous "
                "futures inside an event loop; await their results first, or make "
                f"{self.name!r} an async flow."
            )
        return resolve_inputs(args, kwargs, seam.states_when_done(upstream))

    async def _inputs_async(
        self, args: tuple, kwargs: dict
    ) -> Tuple[tuple, dict, Optional[State[Any]]]:
        args, kwargs, upstream, _ = mark_inputs(args, kwargs)
        if upstream is None:
            return args, kwargs, None
        return resolve_inputs(args, kwargs, await seam.astates_when_done(upstream))


class _BodyRaised(Exception):
    """What a flow's body raised, on its way out of the runner's block."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(exc)
        self.exc = exc


@contextlib.contextmanager
def _from_body() -> Iterator[None]:
    # A body that raises leaves the runner's block as an exception does (calls not
    # started cancelled, owned workers stopped), so a hung call cannot hold the flow;
    # what the runner itself raises is not the body's, and goes on.
    try:
        yield
    except Exception as exc:
        raise _BodyRaised(exc) from exc


def _is_state(value: Any) -> bool:
    return isinstance(value, State)


class _FlowDecorator(Protocol):
    """What ``@flow(...)`` with options returns: it makes a sync or an async flow."""

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Flow[P, Coroutine[Any, Any, State[T]]]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> Flow[P, State[T]]: ...


# An async function fits both overloads; the first, an async flow, wins.
@overload
def flow(  # type: ignore[overload-overlap]
    fn: Callable[P, Coroutine[Any, Any, T]], /
) -> Flow[P, Coroutine[Any, Any, State[T]]]: ...


@overload
def flow(fn: Callable[P, T], /) -> Flow[P, State[T]]: ...


@overload
def flow(
    *,
    name: Optional[str] = None,
    task_runner: Optional[RunnerSpec] = None,
    timeout_seconds: Optional[float] = None,
) -> _FlowDecorator: ...


def flow(
    fn: Optional[Callable[..., Any]] = None,
    /,
    *,
    name: Optional[str] = None,
    task_runner: Optional[RunnerSpec] = None,
    timeout_seconds: Optional[float] = None,
) -> Any:
    """Make a function a flow: ``@flow`` or ``@flow(name=..., task_runner=...)``.

    Calling the flow starts its runner, runs the body (task calls inside it are
    submitted to the runner), waits for every task it submitted and returns the flow's
    State: ``Completed`` holding the return value, with futures in it replaced by their
    States; ``Failed`` holding the exception if the body raised, or holding the return
    value if a State in it did not complete. An async flow's call returns a coroutine.
    A flow called inside another flow runs there and then, with its own runner.

    >>> from taskrunners import ConcurrentTaskRunner, flow, task
    >>> @task
    ... def double(x):
    ...     return 2 * x
    >>> @flow(task_runner=ConcurrentTaskRunner())
    ... def doubles():
    ...     return [double(x) for x in range(3)]
    >>> [state.result() for state in doubles().result()]
    [0, 2, 4]

    :param name: the flow's name; defaults to the function's name
    :param task_runner: a runner instance or class from :mod:`taskrunners`; None for
        ``ConcurrentTaskRunner()``. A synchronous flow drives its blocking twin.
    :param timeout_seconds: the most seconds a call of the flow may run; past it its
        task runs are stopped and its State is Failed, named "TimedOut"
    :return: a :class:`Flow`, or a decorator making one
    """
    if fn is None:
        seam.check_timeout(timeout_seconds, "timeout_seconds")  # at the decorator, not later
        return functools.partial(
            Flow, name=name, task_runner=task_runner, timeout_seconds=timeout_seconds
        )
    return Flow(fn, name=name, task_runner=task_runner, timeout_seconds=timeout_seconds)
