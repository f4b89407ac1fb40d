"""Flows and tasks: ``@flow`` / ``@task``, a small in-process engine with no server.

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
asyncio or trio loop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import threading
import time
import uuid
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import anyio
import tenacity

from taskrunners._collections import iter_leaves, visit_collection
from taskrunners._core import seam
from taskrunners._core.base import BlockingTaskRunner
from taskrunners._core.calls import block_until_done
from taskrunners._waiting import in_event_loop, wait_until_done
from taskrunners.futures import PrefectFuture, TaskRun
from taskrunners.states import Completed, Failed, Pending, State
from taskrunners.task_runners import BaseTaskRunner, ConcurrentTaskRunner, _FacadeRunner

__all__ = ["Flow", "Task", "flow", "task", "unmapped", "wait", "as_completed", "DoneAndNotDone"]

task_logger = logging.getLogger("taskrunners.task")
flow_logger = logging.getLogger("taskrunners.flow")

RunnerSpec = Union[BaseTaskRunner, BlockingTaskRunner, type]


# -- the flow run context ------------------------------------------------------------


class _FlowRun:
    """One call of a flow: the started runner its tasks go to."""

    __slots__ = ("flow", "runner", "asynchronous", "_numbers")

    def __init__(self, flow: "Flow", runner: Any, asynchronous: bool) -> None:
        self.flow = flow
        self.runner = runner
        self.asynchronous = asynchronous
        self._numbers: Dict[str, Iterator[int]] = {}

    def task_run(self, task: "Task") -> TaskRun:
        numbers = self._numbers.get(task.name)
        if numbers is None:
            numbers = self._numbers.setdefault(task.name, itertools.count())
        return TaskRun(name=f"{task.name}-{next(numbers)}")

    def submit(self, task: "Task", args: tuple, kwargs: dict) -> PrefectFuture:
        """Submit without awaiting: a plain task anywhere, or any task in a sync flow."""
        task_run = self.task_run(task)
        run_fn, run_kwargs = _task_call(task, task_run, args, kwargs)
        runner = self.runner
        if not self.asynchronous:
            return runner.submit(task_run, run_fn, run_kwargs)
        # A plain run_fn goes to the facade's blocking core whatever the facade does,
        # so it can be submitted from this synchronous call.
        call = seam.submit_call(seam.core_of(runner), task_run, run_fn, run_kwargs)
        return seam.bind(PrefectFuture(task_run, runner, asynchronous=True), call)

    async def submit_async(self, task: "Task", args: tuple, kwargs: dict) -> PrefectFuture:
        task_run = self.task_run(task)
        run_fn, run_kwargs = _task_call(task, task_run, args, kwargs)
        return await self.runner.submit(task_run, run_fn, run_kwargs)


_current_flow_run: contextvars.ContextVar[Optional[_FlowRun]] = contextvars.ContextVar(
    "taskrunners_flow_run", default=None
)


# -- arguments: futures and states in, data out --------------------------------------


class _Upstream:
    """Stands in a task's arguments for an upstream future, by run id.

    The future itself travels in the ``upstream`` run kwarg, where the runner swaps it
    for its final State; the id names the upstream run if it did not complete.
    """

    __slots__ = ("run_id",)

    def __init__(self, run_id: uuid.UUID) -> None:
        self.run_id = run_id

    def __getstate__(self) -> uuid.UUID:
        return self.run_id

    def __setstate__(self, run_id: uuid.UUID) -> None:
        self.run_id = run_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Upstream) and other.run_id == self.run_id

    def __hash__(self) -> int:
        return hash(self.run_id)


def _mark_inputs(args: tuple, kwargs: dict) -> Tuple[tuple, dict, Optional[dict]]:
    """Swap futures in the arguments for markers; the futures by run id, or None."""
    upstream: Dict[uuid.UUID, PrefectFuture] = {}
    found_state = False

    def mark(value: Any) -> Any:
        nonlocal found_state
        if isinstance(value, PrefectFuture):
            upstream[value.run_id] = value
            return _Upstream(value.run_id)
        if isinstance(value, State):
            found_state = True
        return value

    args = visit_collection(args, mark)
    kwargs = visit_collection(kwargs, mark)
    return args, kwargs, (upstream if upstream or found_state else None)


def _resolve_inputs(
    args: tuple, kwargs: dict, upstream: Dict[uuid.UUID, State]
) -> Tuple[tuple, dict, Optional[State]]:
    """Swap markers and States for their data; a NotReady state if one did not complete."""
    not_ready: List[State] = []

    def resolve(value: Any) -> Any:
        if isinstance(value, _Upstream):
            state, run_id = upstream[value.run_id], value.run_id
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


class _TaskCall:
    """One task run's task and arguments, already scanned: runners need not walk them."""

    __slots__ = ("task", "task_run_name", "args", "kwargs")

    def __init__(self, task: "Task", task_run_name: str, args: tuple, kwargs: dict) -> None:
        self.task = task
        self.task_run_name = task_run_name
        self.args = args
        self.kwargs = kwargs

    def __getstate__(self) -> tuple:
        return (self.task, self.task_run_name, self.args, self.kwargs)

    def __setstate__(self, state: tuple) -> None:
        self.task, self.task_run_name, self.args, self.kwargs = state


def _task_call(
    task: "Task", task_run: TaskRun, args: tuple, kwargs: dict
) -> Tuple[Callable[..., Any], Dict[str, Any]]:
    args, kwargs, upstream = _mark_inputs(args, kwargs)
    run_kwargs: Dict[str, Any] = {"call": _TaskCall(task, task_run.name, args, kwargs)}
    if upstream is not None:
        run_kwargs["upstream"] = upstream
    return (_arun_task if task.isasync else _run_task), run_kwargs


# The run_fns: module-level so cloudpickle sends them by reference to worker
# processes, which import this module; the task and its arguments travel by value.


def _run_task(call: _TaskCall, upstream: Optional[Dict[uuid.UUID, State]] = None) -> State:
    """Run a plain task's body (with its retries) to a State."""
    args, kwargs = call.args, call.kwargs
    if upstream is not None:
        args, kwargs, not_ready = _resolve_inputs(args, kwargs, upstream)
        if not_ready is not None:
            return not_ready
    # A task called from inside a task body is a plain call, not a submission.
    token = _current_flow_run.set(None)
    try:
        return call.task._run(call.task_run_name, args, kwargs)
    finally:
        _current_flow_run.reset(token)


async def _arun_task(call: _TaskCall, upstream: Optional[Dict[uuid.UUID, State]] = None) -> State:
    """Run an async task's body (with its retries) to a State."""
    args, kwargs = call.args, call.kwargs
    if upstream is not None:
        args, kwargs, not_ready = _resolve_inputs(args, kwargs, upstream)
        if not_ready is not None:
            return not_ready
    token = _current_flow_run.set(None)
    try:
        return await call.task._arun(call.task_run_name, args, kwargs)
    finally:
        _current_flow_run.reset(token)


# -- retries ----------------------------------------------------------------------------


class _RetryDelays(tenacity.wait.wait_base):
    """Seconds before each retry: one number for all, or a list (the last one repeats)."""

    def __init__(self, delays: Union[float, Sequence[float]]) -> None:
        self.delays = delays

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        delays = self.delays
        if isinstance(delays, (int, float)):
            return float(delays)
        return float(delays[min(retry_state.attempt_number, len(delays)) - 1])


def _log_retry(task_run_name: str, attempts: int) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        number = retry_state.attempt_number
        exc = retry_state.outcome.exception()
        outcome = f"raised {type(exc).__name__}: {exc}" if exc else (
            f"returned {retry_state.outcome.result()!r}"
        )
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        task_logger.warning(
            "Task run %r: attempt %d of %d %s; retrying in %g s.",
            task_run_name, number, attempts, outcome, delay,
            extra={"task_run_name": task_run_name, "attempt": number},
        )

    return before_sleep


def _log_attempt(task_run_name: str, number: int, attempts: int) -> None:
    task_logger.debug(
        "Task run %r: attempt %d of %d.", task_run_name, number, attempts,
        extra={"task_run_name": task_run_name, "attempt": number},
    )


def _failed(task_run_name: str, exc: Exception, attempts: int) -> State:
    after = f" after {attempts} attempts" if attempts > 1 else ""
    message = f"Task run {task_run_name!r} failed{after}: {type(exc).__name__}: {exc}"
    task_logger.error(message, extra={"task_run_name": task_run_name, "attempt": attempts})
    return Failed(data=exc, message=message)


# -- tasks ----------------------------------------------------------------------------------


class Task:
    """A function that a flow runs on its task runner; made by :func:`task`.

    :param fn: the function, plain or ``async``
    :param name: the task's name; defaults to the function's name
    :param retries: how many times to run the body again after it raised an ``Exception``
    :param retry_delay_seconds: seconds to wait before each retry: one number, or a list
        of delays for successive retries (the last one repeats)
    :raises TypeError: if ``fn`` is not callable
    :raises ValueError: for a negative or non-integer ``retries`` or a bad delay
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: Optional[str] = None,
        retries: int = 0,
        retry_delay_seconds: Union[float, Sequence[float]] = 0,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a function, got {type(fn).__name__}: {fn!r}.")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(
                f"`retries` must be an integer >= 0, got {retries!r}; e.g. @task(retries=3)."
            )
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self.retries = retries
        self.retry_delay_seconds = _checked_delays(retry_delay_seconds)
        self.isasync = inspect.iscoroutinefunction(fn)
        self._signature: Optional[inspect.Signature] = None
        functools.update_wrapper(self, fn)

    def __getstate__(self) -> Dict[str, Any]:
        data = self.__dict__.copy()
        data["_signature"] = None  # annotations need not pickle
        return data

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, fn={self.fn!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Submit the task inside a flow; call the function outside one.

        Inside a flow this returns a :class:`PrefectFuture` (in an async flow, an
        async task's call is awaited to get it). Outside a flow it returns what the
        function returns.
        """
        flow_run = _current_flow_run.get()
        if flow_run is None:
            return self.fn(*args, **kwargs)
        return self._submit(flow_run, args, kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """Submit the task to the current flow's runner; the explicit spelling of a call.

        :return: a :class:`PrefectFuture`; in an async flow an async task's submission
            is awaited to get it
        :raises RuntimeError: outside a flow
        """
        flow_run = _current_flow_run.get()
        if flow_run is None:
            raise RuntimeError(
                f"Task {self.name!r} can only be submitted inside a flow: call it from a "
                f"function decorated with @flow, or call {self.name}(...) to run it here."
            )
        return self._submit(flow_run, args, kwargs)

    def map(self, *args: Any, **kwargs: Any) -> Any:
        """Submit one run per element of the iterable arguments; returns their futures.

        Iterable arguments are zipped, so they must have one length; wrap an argument in
        :class:`unmapped` to pass it whole to every run. Outside a flow, the function
        is called once per element and the list of values is returned.

        >>> from taskrunners import flow, task, unmapped
        >>> @task
        ... def add(x, y):
        ...     return x + y
        >>> @flow
        ... def sums():
        ...     return [f.result() for f in add.map([1, 2, 3], unmapped(10))]
        >>> sums().result()
        [11, 12, 13]

        :return: a list of :class:`PrefectFuture`, one per element (in an async flow, an
            async task's map is awaited to get it)
        :raises TypeError: if an argument to map over is not iterable, or is a future
        :raises ValueError: if the iterables differ in length, or there is none
        """
        calls = _mapped_calls(self.name, args, kwargs)
        flow_run = _current_flow_run.get()
        for call_args, call_kwargs in calls:
            self._check_arguments(call_args, call_kwargs)
        if flow_run is None:
            if self.isasync:
                return self._map_plain_async(calls)
            return [self.fn(*call_args, **call_kwargs) for call_args, call_kwargs in calls]
        if flow_run.asynchronous and self.isasync:
            return self._map_async(flow_run, calls)
        return [flow_run.submit(self, call_args, call_kwargs) for call_args, call_kwargs in calls]

    async def _map_plain_async(self, calls: List[Tuple[tuple, dict]]) -> List[Any]:
        return [await self.fn(*call_args, **call_kwargs) for call_args, call_kwargs in calls]

    async def _map_async(
        self, flow_run: _FlowRun, calls: List[Tuple[tuple, dict]]
    ) -> List[PrefectFuture]:
        return [await flow_run.submit_async(self, a, k) for a, k in calls]

    def _submit(self, flow_run: _FlowRun, args: tuple, kwargs: dict) -> Any:
        self._check_arguments(args, kwargs)
        if flow_run.asynchronous and self.isasync:
            return flow_run.submit_async(self, args, kwargs)
        return flow_run.submit(self, args, kwargs)

    def _check_arguments(self, args: tuple, kwargs: dict) -> None:
        _check_arguments(self, "Task", args, kwargs)

    def _run(self, task_run_name: str, args: tuple, kwargs: dict) -> State:
        attempts = self.retries + 1
        if attempts == 1:
            _log_attempt(task_run_name, 1, 1)
            try:
                value = self.fn(*args, **kwargs)
            except Exception as exc:
                return _failed(task_run_name, exc, 1)
            return _final(task_run_name, value, 1)
        try:
            value = self._retrying(tenacity.Retrying, task_run_name, attempts)(
                self.fn, *args, **kwargs
            )
        except Exception as exc:
            return _after_retries(task_run_name, exc, attempts)
        return _final(task_run_name, value, attempts)

    async def _arun(self, task_run_name: str, args: tuple, kwargs: dict) -> State:
        attempts = self.retries + 1
        if attempts == 1:
            _log_attempt(task_run_name, 1, 1)
            try:
                value = await self.fn(*args, **kwargs)
            except Exception as exc:
                return _failed(task_run_name, exc, 1)
            return _final(task_run_name, value, 1)
        try:
            value = await self._retrying(tenacity.AsyncRetrying, task_run_name, attempts)(
                self.fn, *args, **kwargs
            )
        except Exception as exc:
            return _after_retries(task_run_name, exc, attempts)
        return _final(task_run_name, value, attempts)

    def _retrying(self, kind: type, task_run_name: str, attempts: int) -> Any:
        # A body that raises, or returns a Failed state, is run again (as Prefect 2 did).
        options: Dict[str, Any] = {}
        if kind is tenacity.AsyncRetrying:
            options["sleep"] = anyio.sleep  # tenacity's default sleep would tie retries to asyncio
        return kind(
            stop=tenacity.stop_after_attempt(attempts),
            wait=_RetryDelays(self.retry_delay_seconds),
            retry=tenacity.retry_if_exception_type(Exception) | tenacity.retry_if_result(_is_failed),
            before=lambda state: _log_attempt(task_run_name, state.attempt_number, attempts),
            before_sleep=_log_retry(task_run_name, attempts),
            reraise=True,
            **options,
        )


def _is_failed(value: Any) -> bool:
    return isinstance(value, State) and value.is_failed()


def _final(task_run_name: str, value: Any, attempts: int) -> State:
    """The task run's State once its body returned ``value``: a State stands as it is."""
    if not isinstance(value, State):
        return Completed(data=value)
    if value.is_failed():
        task_logger.error(
            "Task run %r returned %r.", task_run_name, value,
            extra={"task_run_name": task_run_name, "attempt": attempts},
        )
    return value


def _after_retries(task_run_name: str, exc: Exception, attempts: int) -> State:
    if isinstance(exc, tenacity.RetryError):  # every attempt returned a Failed state
        return _final(task_run_name, exc.last_attempt.result(), attempts)
    return _failed(task_run_name, exc, attempts)


def _checked_delays(delays: Any) -> Union[float, List[float]]:
    def is_delay(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0

    if is_delay(delays):
        return delays
    if isinstance(delays, (list, tuple)) and delays and all(is_delay(d) for d in delays):
        return list(delays)
    raise ValueError(
        "`retry_delay_seconds` must be a number of seconds >= 0 or a non-empty list of "
        f"them (one per retry, the last repeats), got {delays!r}; e.g. "
        "@task(retries=3, retry_delay_seconds=[1, 2, 4])."
    )


def _check_arguments(owner: Any, kind: str, args: tuple, kwargs: dict) -> None:
    signature = owner._signature
    if signature is None:
        try:
            signature = owner._signature = inspect.signature(owner.fn)
        except (TypeError, ValueError):  # a builtin without a signature: let the call decide
            return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{kind} {owner.name!r}: {exc}") from None


class unmapped:
    """Marks an argument of :meth:`Task.map` as constant: each run gets it whole.

    :param value: the argument every mapped run receives
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"unmapped({self.value!r})"


def _mapped_calls(name: str, args: tuple, kwargs: dict) -> List[Tuple[tuple, dict]]:
    def describe(key: Union[int, str]) -> str:
        return f"positional argument {key}" if isinstance(key, int) else f"argument {key!r}"

    mapped: Dict[Union[int, str], list] = {}
    for key, value in itertools.chain(enumerate(args), kwargs.items()):
        if isinstance(value, unmapped):
            continue
        if isinstance(value, (PrefectFuture, State)):
            raise TypeError(
                f"{name}.map() cannot map over {describe(key)}, a {type(value).__name__}: "
                "pass its data (`future.result()`, awaited in an async flow), or wrap it in "
                "unmapped(...) to give it whole to every run."
            )
        try:
            mapped[key] = list(value)
        except TypeError:
            raise TypeError(
                f"{name}.map() maps over {describe(key)}, but {type(value).__name__} is not "
                "iterable; wrap a constant argument in unmapped(...)."
            ) from None
    if not mapped:
        raise ValueError(
            f"{name}.map() needs at least one iterable argument to map over; every "
            "argument given is wrapped in unmapped(...)."
        )
    lengths = {len(values) for values in mapped.values()}
    if len(lengths) > 1:
        found = ", ".join(f"{describe(key)} has {len(values)}" for key, values in mapped.items())
        raise ValueError(
            f"{name}.map() needs iterables of one length, but {found}; wrap constant "
            "arguments in unmapped(...)."
        )
    def pick(key: Union[int, str], value: Any, index: int) -> Any:
        return mapped[key][index] if key in mapped else value.value

    return [
        (
            tuple(pick(key, value, index) for key, value in enumerate(args)),
            {key: pick(key, value, index) for key, value in kwargs.items()},
        )
        for index in range(lengths.pop())
    ]


def task(
    fn: Optional[Callable[..., Any]] = None,
    /,
    *,
    name: Optional[str] = None,
    retries: int = 0,
    retry_delay_seconds: Union[float, Sequence[float]] = 0,
) -> Any:
    """Make a function a task: ``@task`` or ``@task(name=..., retries=..., ...)``.

    Inside a flow, calling the task submits it to the flow's runner and returns a
    :class:`PrefectFuture`; futures and States in its arguments (nested in lists,
    tuples, sets, dicts and dataclasses too) reach the body as their data. If an
    upstream run did not complete, the run is ``Pending(name="NotReady")`` and its body
    never runs. A body that raises gives a ``Failed`` state holding the exception, once
    its retries are spent; every attempt is logged on the ``taskrunners.task`` logger.

    >>> @task(retries=2, retry_delay_seconds=[0.1, 1])
    ... def fetch(url):
    ...     ...

    :param name: the task's name; defaults to the function's name
    :param retries: how many times to run the body again after it raised
    :param retry_delay_seconds: seconds before each retry: a number, or a list of
        delays for successive retries (the last one repeats)
    :return: a :class:`Task`, or a decorator making one
    """
    if fn is None:
        return functools.partial(
            Task, name=name, retries=retries, retry_delay_seconds=retry_delay_seconds
        )
    return Task(fn, name=name, retries=retries, retry_delay_seconds=retry_delay_seconds)


# -- flows ------------------------------------------------------------------------------------


def _checked_runner(runner: Any, flow_name: str) -> RunnerSpec:
    if isinstance(runner, type):
        if issubclass(runner, (_FacadeRunner, BlockingTaskRunner)):
            return runner
    elif isinstance(runner, (_FacadeRunner, BlockingTaskRunner)):
        return runner
    raise TypeError(
        f"Flow {flow_name!r}: `task_runner` must be one of taskrunners' runners, e.g. "
        f"taskrunners.ConcurrentTaskRunner() or the class itself, got {runner!r}."
    )


_claims_lock = threading.Lock()
_claimed: Set[int] = set()


@contextlib.contextmanager
def _runner_for_call(configured: RunnerSpec) -> Iterator[Any]:
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
        yield _fresh_copy(configured)
        return
    try:
        yield configured
    finally:
        with _claims_lock:
            _claimed.discard(key)


def _fresh_copy(runner: Any) -> Any:
    """A new, unstarted runner of the same class with the same settings."""
    core = seam.core_of(runner)
    try:
        settings = {
            parameter.name: getattr(core, parameter.name)
            for parameter in inspect.signature(type(core)).parameters.values()
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        }
        return type(runner)(**settings)
    except Exception as exc:  # a setting the runner does not keep under its own name
        raise RuntimeError(
            f"The task runner {runner} is in use by another flow run and could not be "
            f"copied ({type(exc).__name__}: {exc}); give this flow its own runner, e.g. "
            f"@flow(task_runner={type(runner).__name__}(...)), or pass the class."
        ) from exc


_call_of = seam.call_of


def _done_state(future: PrefectFuture) -> State:
    return seam.state_of(seam.call_of(future))


def _is_future(value: Any) -> bool:
    return isinstance(value, PrefectFuture)


def _is_state(value: Any) -> bool:
    return isinstance(value, State)


def _futures_to_states(value: Any) -> Any:
    return visit_collection(value, lambda v: _done_state(v) if isinstance(v, PrefectFuture) else v)


class Flow:
    """A function whose task calls run on a task runner; made by :func:`flow`.

    :param fn: the function, plain or ``async``
    :param name: the flow's name; defaults to the function's name
    :param task_runner: a runner instance or class; None for ``ConcurrentTaskRunner()``
    :raises TypeError: if ``fn`` is not callable or ``task_runner`` is not a runner

    ``task_runner`` may be reassigned (``my_flow.task_runner = DaskTaskRunner()``).
    Each call starts the runner for its own duration; when the instance is already in
    use (a subflow given its parent's runner, calls from two threads), the call starts
    a new runner of the same class with the same settings.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: Optional[str] = None,
        task_runner: Optional[RunnerSpec] = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@flow needs a function, got {type(fn).__name__}: {fn!r}.")
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self.isasync = inspect.iscoroutinefunction(fn)
        self.task_runner = task_runner if task_runner is not None else ConcurrentTaskRunner()
        self._signature: Optional[inspect.Signature] = None
        functools.update_wrapper(self, fn)

    @property
    def task_runner(self) -> RunnerSpec:
        """The runner (or runner class) each call of this flow starts."""
        return self._task_runner

    @task_runner.setter
    def task_runner(self, runner: RunnerSpec) -> None:
        self._task_runner = _checked_runner(runner, self.name)

    def __repr__(self) -> str:
        return f"Flow(name={self.name!r}, task_runner={self._task_runner!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the flow; returns its State (a coroutine giving it, for an async flow).

        Futures and States in the arguments (from a parent flow) reach the body as their
        data; if one did not complete, the body does not run and the State is
        ``Pending(name="NotReady")``.
        """
        _check_arguments(self, "Flow", args, kwargs)
        if self.isasync:
            return self._run_async(args, kwargs)
        return self._run_blocking(args, kwargs)

    def _run_blocking(self, args: tuple, kwargs: dict) -> State:
        args, kwargs, not_ready = self._inputs_blocking(args, kwargs)
        if not_ready is not None:
            return not_ready
        failure: Optional[State] = None
        value: Any = None
        with _runner_for_call(self._task_runner) as runner:
            core = seam.core_of(runner)
            token = _current_flow_run.set(_FlowRun(self, core, asynchronous=False))
            try:
                flow_logger.debug("Flow run %r: starting on %s.", self.name, core)
                with core.start():
                    try:
                        value = self.fn(*args, **kwargs)
                    except Exception as exc:
                        failure = self._failed(exc)
            finally:
                _current_flow_run.reset(token)
        if failure is not None:
            return failure
        block_until_done([_call_of(f) for f in iter_leaves(value, _is_future)])
        return self._final_state(_futures_to_states(value))

    async def _run_async(self, args: tuple, kwargs: dict) -> State:
        args, kwargs, not_ready = await self._inputs_async(args, kwargs)
        if not_ready is not None:
            return not_ready
        failure: Optional[State] = None
        value: Any = None
        with _runner_for_call(self._task_runner) as runner:
            if not isinstance(runner, _FacadeRunner):
                raise TypeError(
                    f"Flow {self.name!r} is async and needs an async runner: use "
                    f"taskrunners.{type(runner).__name__}(...) rather than the blocking "
                    f"taskrunners.sync.{type(runner).__name__}(...)."
                )
            token = _current_flow_run.set(_FlowRun(self, runner, asynchronous=True))
            try:
                flow_logger.debug("Flow run %r: starting on %s.", self.name, runner)
                async with runner.start():
                    try:
                        value = await self.fn(*args, **kwargs)
                    except Exception as exc:
                        failure = self._failed(exc)
            finally:
                _current_flow_run.reset(token)
        # A runner may have turned a cancellation into a Crashed task run (the seed's
        # Sequential runner does): the flow must not complete as if nothing happened.
        await anyio.lowlevel.checkpoint_if_cancelled()
        if failure is not None:
            return failure
        for future in iter_leaves(value, _is_future):
            await wait_until_done(_call_of(future), None)
        return self._final_state(_futures_to_states(value))

    def _failed(self, exc: Exception) -> State:
        message = f"Flow run {self.name!r} raised {type(exc).__name__}: {exc}"
        flow_logger.error(message)
        return Failed(data=exc, message=message)

    def _final_state(self, value: Any) -> State:
        states = list(iter_leaves(value, _is_state))
        unfinished = sum(1 for state in states if not state.is_completed())
        if unfinished:
            return Failed(
                data=value,
                message=f"{unfinished}/{len(states)} states returned by flow run "
                f"{self.name!r} did not complete.",
            )
        return Completed(data=value)

    def _inputs_blocking(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict, Optional[State]]:
        args, kwargs, upstream = _mark_inputs(args, kwargs)
        if upstream is None:
            return args, kwargs, None
        calls = [_call_of(future) for future in upstream.values()]
        unfinished = [f for f, call in zip(upstream.values(), calls) if not call.done()]
        if unfinished and in_event_loop() and any(f.asynchronous for f in unfinished):
            # Their calls may need this very event loop to finish.
            raise RuntimeError(
                f"Flow {self.name!r} is synchronous and was given unfinished asynchronous "
                "futures inside an event loop; await their results first, or make "
                f"{self.name!r} an async flow."
            )
        block_until_done(calls)
        states = {run_id: _done_state(f) for run_id, f in upstream.items()}
        return _resolve_inputs(args, kwargs, states)

    async def _inputs_async(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict, Optional[State]]:
        args, kwargs, upstream = _mark_inputs(args, kwargs)
        if upstream is None:
            return args, kwargs, None
        for future in upstream.values():
            await wait_until_done(_call_of(future), None)
        states = {run_id: _done_state(f) for run_id, f in upstream.items()}
        return _resolve_inputs(args, kwargs, states)


def flow(
    fn: Optional[Callable[..., Any]] = None,
    /,
    *,
    name: Optional[str] = None,
    task_runner: Optional[RunnerSpec] = None,
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
    :return: a :class:`Flow`, or a decorator making one
    """
    if fn is None:
        return functools.partial(Flow, name=name, task_runner=task_runner)
    return Flow(fn, name=name, task_runner=task_runner)


# -- waiting for futures from any runner ------------------------------------------------


class DoneAndNotDone(NamedTuple):
    """What :func:`wait` returns: the futures done, and those not done, as sets."""

    done: Set[PrefectFuture]
    not_done: Set[PrefectFuture]


class _Completions:
    """Collects futures as their calls finish; waited on by threads and event loops."""

    def __init__(self, futures: Iterable[PrefectFuture]) -> None:
        self.futures = list(dict.fromkeys(futures))
        calls = [_call_of(future) for future in self.futures]
        self.unreported = len(self.futures)
        self._lock = threading.Lock()
        self._finished: collections.deque = collections.deque()
        self._signal: concurrent.futures.Future = concurrent.futures.Future()
        for future, call in zip(self.futures, calls):
            call.add_done_callback(functools.partial(self._arrive, future))

    def _arrive(self, future: PrefectFuture, _: Any) -> None:
        with self._lock:
            self._finished.append(future)
            signal = self._signal
        try:
            signal.set_result(None)
        except concurrent.futures.InvalidStateError:
            pass

    def next(self) -> Tuple[Optional[PrefectFuture], Optional[concurrent.futures.Future]]:
        """A finished future not reported yet, or a signal set when the next one finishes."""
        with self._lock:
            if self._finished:
                self.unreported -= 1
                return self._finished.popleft(), None
            if self._signal.done():
                self._signal = concurrent.futures.Future()
            return None, self._signal


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _timeout_error(completions: _Completions) -> TimeoutError:
    return TimeoutError(
        f"{completions.unreported} (of {len(completions.futures)}) futures unfinished."
    )


def wait(
    futures: Iterable[PrefectFuture], timeout: Optional[float] = None
) -> Union[DoneAndNotDone, Awaitable[DoneAndNotDone]]:
    """Wait until every future is done, or ``timeout`` seconds pass.

    Works on futures from any runner, like :func:`concurrent.futures.wait`. Like
    :meth:`PrefectFuture.wait`, it blocks for blocking futures (a sync flow's, the
    blocking twins') and returns an awaitable for asynchronous ones (an async flow's,
    the facade's) or, given no futures, when called inside an event loop:

    >>> done, not_done = wait(futures, timeout=10)           # doctest: +SKIP
    >>> done, not_done = await wait(futures, timeout=10)     # in async code  # doctest: +SKIP

    :param futures: :class:`PrefectFuture` objects; duplicates count once
    :param timeout: the most seconds to wait; None to wait until all are done
    :return: ``DoneAndNotDone(done, not_done)``, two sets of futures; a timeout is
        not an error
    :raises TypeError: if an item is not a PrefectFuture
    """
    completions = _Completions(futures)
    deadline = _deadline(timeout)
    if completions.futures:
        asynchronous = any(future.asynchronous for future in completions.futures)
    else:
        asynchronous = in_event_loop()
    if asynchronous:
        return _wait_async(completions, deadline)
    while completions.unreported:
        future, signal = completions.next()
        if future is None and not concurrent.futures.wait([signal], _remaining(deadline)).done:
            break
    return _done_and_not_done(completions)


async def _wait_async(completions: _Completions, deadline: Optional[float]) -> DoneAndNotDone:
    while completions.unreported:
        future, signal = completions.next()
        if future is None and not await wait_until_done(signal, _remaining(deadline)):
            break
    return _done_and_not_done(completions)


def _done_and_not_done(completions: _Completions) -> DoneAndNotDone:
    done = {future for future in completions.futures if _call_of(future).done()}
    return DoneAndNotDone(done, set(completions.futures) - done)


class _AsCompleted:
    """Futures in the order they finish, by ``for`` (blocking) or ``async for``."""

    def __init__(self, futures: Iterable[PrefectFuture], timeout: Optional[float]) -> None:
        self._completions = _Completions(futures)
        self._deadline = _deadline(timeout)

    def __iter__(self) -> Iterator[PrefectFuture]:
        if in_event_loop() and any(f.asynchronous for f in self._completions.futures):
            # Blocking here could starve the calls that run on this very loop.
            raise RuntimeError(
                "as_completed() was iterated with `for` inside an event loop over "
                "asynchronous futures; use `async for future in as_completed(...)`."
            )
        return self

    def __next__(self) -> PrefectFuture:
        completions = self._completions
        while True:
            future, signal = completions.next()
            if future is not None:
                return future
            if not completions.unreported:
                raise StopIteration
            if not concurrent.futures.wait([signal], _remaining(self._deadline)).done:
                raise _timeout_error(completions)

    def __aiter__(self) -> AsyncIterator[PrefectFuture]:
        return self

    async def __anext__(self) -> PrefectFuture:
        completions = self._completions
        while True:
            future, signal = completions.next()
            if future is not None:
                return future
            if not completions.unreported:
                raise StopAsyncIteration
            if not await wait_until_done(signal, _remaining(self._deadline)):
                raise _timeout_error(completions)


def as_completed(
    futures: Iterable[PrefectFuture], timeout: Optional[float] = None
) -> _AsCompleted:
    """Yield the futures as their runs finish, from any runner.

    Iterate with ``for`` in synchronous code (it blocks the thread) and with
    ``async for`` in async code (it waits without a thread, on asyncio or trio);
    either works on blocking and asynchronous futures alike. ``for`` inside an event
    loop over asynchronous futures is refused, since blocking there could starve the
    very calls being waited for.

    >>> for future in as_completed(futures, timeout=60):        # doctest: +SKIP
    ...     print(future.result())
    >>> async for future in as_completed(futures, timeout=60):  # doctest: +SKIP
    ...     print(await future.result())

    :param futures: :class:`PrefectFuture` objects; duplicates are yielded once
    :param timeout: the most seconds, counted from this call, until the last one is
        yielded; None for no limit
    :raises TimeoutError: while iterating, when ``timeout`` passes first
    :raises TypeError: if an item is not a PrefectFuture
    """
    return _AsCompleted(futures, timeout)
