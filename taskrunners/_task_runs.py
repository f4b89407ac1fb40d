"""A task run, from submission to State: what travels to the runner and what runs there.

How a task run travels::

    flow side: submit_task() names the run (FlowRun.new_task_run), makes its
               submission() ── the run_fn (run_task or arun_task) and its run_kwargs:
               a TaskInvocation (the task, its arguments with futures marked) and, if
               any, the upstream futures, which the runner swaps for their States ──
               and submits it to the flow run's runner (FlowRun.submit); submit_mapped()
               does so for the runs of a task.map, MAP_PART at a time (the workers
               start on a part while the next is made), with one run_fn for all and
               names made when read (FlowRun.new_task_runs)
    worker:    run_task() resolves the arguments (or ends NotReady), then runs the
               task's body with its retries: an attempt that raises an Exception, or
               returns a Failed state, is run again; the last outcome is the State

Every attempt is logged on the ``taskrunners.task`` logger, where the body runs.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

import anyio
import tenacity

from taskrunners._core import seam
from taskrunners._core.seam import Memo, all_unchanging, snapshot_each, unchanging
from taskrunners._flow_engine import FlowRun, current_flow_run, mark_inputs, resolve_inputs
from taskrunners.futures import PrefectFuture, TaskRun
from taskrunners.states import Completed, Failed, State, StateType, exception_to_crashed_state

__all__ = [
    "RunnableTask",
    "TaskInvocation",
    "submit_task",
    "asubmit_task",
    "submit_mapped",
    "submission",
    "run_task",
    "arun_task",
]

task_logger = logging.getLogger("taskrunners.task")
_COMPLETED = Completed().name


class RunnableTask(Protocol):
    """What a run needs of its task: a :class:`~taskrunners.tasks.Task` is one."""

    @property
    def name(self) -> str: ...

    @property
    def fn(self) -> Callable[..., Any]: ...

    @property
    def isasync(self) -> bool: ...

    @property
    def retries(self) -> int: ...

    @property
    def retry_delay_seconds(self) -> Union[float, Sequence[float]]: ...

    @property
    def timeout_seconds(self) -> Optional[float]: ...


class TaskInvocation:
    """One task run's task and arguments, already marked: runners need not walk them."""

    __slots__ = ("task", "task_run_name", "args", "kwargs")

    def __init__(self, task: RunnableTask, task_run_name: str, args: tuple, kwargs: dict) -> None:
        self.task = task
        self.task_run_name = task_run_name
        self.args = args
        self.kwargs = kwargs

    def __getstate__(self) -> tuple:
        return (self.task, self.task_run_name, self.args, self.kwargs)

    def __setstate__(self, state: tuple) -> None:
        self.task, self.task_run_name, self.args, self.kwargs = state

    def __snapshot__(self, memo: Optional[Memo]) -> TaskInvocation:
        """The arguments as they are now, for a runner that sends the call later; the
        task is shared by its runs and sent as it is."""
        # Both are this run's own: only the values in them may be the caller's.
        if all_unchanging(self.args) and all_unchanging(self.kwargs.values()):
            return self
        args = tuple(snapshot_each(self.args, memo))
        kwargs = dict(zip(self.kwargs, snapshot_each(list(self.kwargs.values()), memo)))
        return TaskInvocation(self.task, self.task_run_name, args, kwargs)


@unchanging
class PlainInvocation(TaskInvocation):
    """A task invocation whose arguments are plain numbers, strings or None: it cannot
    change, so a runner that sends calls later takes no snapshot of it."""

    __slots__ = ()


def submit_task(flow_run: FlowRun, task: RunnableTask, args: tuple, kwargs: dict) -> PrefectFuture[Any]:
    """Submit one run of ``task`` to the flow run's runner, without awaiting."""
    task_run = flow_run.new_task_run(task.name)
    run_fn, run_kwargs = submission(task, task_run, args, kwargs)
    if _tries_apart(task):
        return submit_tries(flow_run, task, task_run, run_fn, run_kwargs)
    return flow_run.submit(task_run, run_fn, run_kwargs)


async def asubmit_task(
    flow_run: FlowRun, task: RunnableTask, args: tuple, kwargs: dict
) -> PrefectFuture[Any]:
    """Submit one run of an async ``task`` through an async flow run's facade."""
    task_run = flow_run.new_task_run(task.name)
    run_fn, run_kwargs = submission(task, task_run, args, kwargs)
    if _tries_apart(task):
        return submit_tries(flow_run, task, task_run, run_fn, run_kwargs)
    return await flow_run.submit_async(task_run, run_fn, run_kwargs)


#: How many runs of a map are submitted together: the workers start on the first
#: ones while the next are made, and fewer runs wait at once.
MAP_PART = 1000


def submit_mapped(
    flow_run: FlowRun, task: RunnableTask, runs: Iterable[Tuple[tuple, dict]]
) -> List[PrefectFuture[Any]]:
    """Submit one run of ``task`` per ``(args, kwargs)`` (``task.map``), part by part.

    The run_fn (with the task's time limit) is made once for the map; each run has
    its own name, TaskRun and invocation, made when its part is submitted. A value
    the runs share is snapshotted once for all of them, whichever part they are in.
    """
    run_fn = seam.with_limit(arun_task if task.isasync else run_task, task.timeout_seconds)
    kwargs_of = functools.partial(_run_kwargs, task)
    runs = iter(runs)
    futures: List[PrefectFuture[Any]] = []
    if _tries_apart(task):
        for args, kwargs in runs:
            task_run = flow_run.new_task_run(task.name)
            run_kwargs = kwargs_of(task_run, (args, kwargs))
            futures.append(submit_tries(flow_run, task, task_run, run_fn, run_kwargs))
        return futures
    memo = seam.map_memo(flow_run.core)
    while True:
        part = list(itertools.islice(runs, MAP_PART))
        if not part:
            return futures
        task_runs = flow_run.new_task_runs(task.name, len(part))
        futures += flow_run.submit_many(task_runs, run_fn, list(map(kwargs_of, task_runs, part)), memo)


# -- tries as calls of their own --------------------------------------------------------------


def _tries_apart(task: RunnableTask) -> bool:
    """Whether the runs of ``task`` retry from the flow run, each try a call of its own.

    So they do when a try has a time limit: a try past it may end its worker, so the
    next one cannot run where it ran, and each try gets a fresh limit.
    """
    return task.timeout_seconds is not None and task.retries > 0


def submit_tries(
    flow_run: FlowRun,
    task: RunnableTask,
    task_run: TaskRun,
    run_fn: Callable[..., Any],
    run_kwargs: Dict[str, Any],
) -> PrefectFuture[Any]:
    """Submit a run of ``task`` whose tries are submitted one by one: a try that ends
    Failed (TimedOut among them) is submitted again after the task's delay, while
    tries are left."""
    attempts = task.retries + 1
    tries = seam.Relay()  # stands for each try in turn
    core = flow_run.core

    def start(number: int) -> None:
        if tries.done():  # cancelled between two tries
            return
        kwargs = dict(run_kwargs, attempt=(number, attempts))
        # A run id of its own for each try: an engine may know a call by it (Dask's
        # key), and would take a try for the one before.
        run = task_run if number == 1 else TaskRun(name=task_run.name)
        try:
            call = seam.call_of(seam.submit(core, run, run_fn, kwargs))
        except BaseException as exc:  # the runner stopped meanwhile
            tries.set_result(exception_to_crashed_state(exc))
            return
        tries.started = call
        call.add_done_callback(lambda done: ended(number, seam.state_of_done(done)))

    def ended(number: int, state: State[Any]) -> None:
        if number == attempts or not state.is_failed() or tries.done():
            tries.set_result(state)
            return
        tries.started = None  # between two tries
        delay = _delay_before(task.retry_delay_seconds, number)
        task_logger.warning(
            "Task run %r: attempt %d of %d %s; retrying in %g s.",
            task_run.name, number, attempts,
            "timed out" if seam.is_timed_out(state) else state.message, delay,
            extra={"task_run_name": task_run.name, "attempt": number},
        )
        # Not from here: this may be an engine's thread, or the submitting one.
        timer = threading.Timer(delay, start, (number + 1,))
        timer.daemon = True
        timer.start()

    seam.track(core, tries)
    start(1)
    owner = flow_run.facade if flow_run.facade is not None else core
    return seam.future_for(tries, task_run, owner, flow_run.asynchronous)


def submission(
    task: RunnableTask, task_run: TaskRun, args: tuple, kwargs: dict
) -> Tuple[Callable[..., Any], Dict[str, Any]]:
    """The ``run_fn`` and ``run_kwargs`` that run ``task`` on these arguments."""
    run_fn = seam.with_limit(arun_task if task.isasync else run_task, task.timeout_seconds)
    return run_fn, _run_kwargs(task, task_run, (args, kwargs))


def _run_kwargs(task: RunnableTask, task_run: TaskRun, run: Tuple[tuple, dict]) -> Dict[str, Any]:
    # The markers are remote.protocol.Upstream placeholders keyed by run id. They must stay
    # inside the TaskInvocation, which no runner walks: in a run kwarg of their own, a
    # remote backend's substitute() would look their run ids up among its references.
    args, kwargs, upstream, plain = mark_inputs(*run)
    if plain:
        return {"invocation": PlainInvocation(task, task_run.name, args, kwargs)}
    run_kwargs: Dict[str, Any] = {"invocation": TaskInvocation(task, task_run.name, args, kwargs)}
    if upstream is not None:
        run_kwargs["upstream"] = upstream
    return run_kwargs


# The run_fns: module-level so cloudpickle sends them by reference to worker
# processes, which import this module; the task and its arguments travel by value.


def run_task(
    invocation: TaskInvocation,
    upstream: Optional[Dict[uuid.UUID, State[Any]]] = None,
    attempt: Optional[Tuple[int, int]] = None,
) -> State[Any]:
    """Run a plain task's body (with its retries) to a State; with ``attempt`` (its
    number, of how many), only that try: the flow run retries (see :func:`submit_tries`)."""
    args, kwargs, not_ready = _arguments(invocation, upstream)
    if not_ready is not None:
        return not_ready
    # Outside the flow: a task called from the body is a plain call (no context
    # manager here: this runs once per call, thousands of times per batch).
    token = current_flow_run.set(None)
    try:
        if attempt is not None:
            return _run_try(invocation.task, invocation.task_run_name, args, kwargs, attempt)
        return _run_body(invocation.task, invocation.task_run_name, args, kwargs)
    finally:
        current_flow_run.reset(token)


def _task_of(run_kwargs: Dict[str, Any]) -> Any:
    # For batching: calls of two tasks share this wrapper, but never a batch.
    return run_kwargs["invocation"].task


run_task.__batch_key__ = _task_of  # type: ignore[attr-defined]


async def arun_task(
    invocation: TaskInvocation,
    upstream: Optional[Dict[uuid.UUID, State[Any]]] = None,
    attempt: Optional[Tuple[int, int]] = None,
) -> State[Any]:
    """Run an async task's body (with its retries) to a State; with ``attempt``, only
    that try, as :func:`run_task`."""
    args, kwargs, not_ready = _arguments(invocation, upstream)
    if not_ready is not None:
        return not_ready
    token = current_flow_run.set(None)  # outside the flow, as in run_task
    try:
        if attempt is not None:
            number, attempts = attempt
            _log_attempt(invocation.task_run_name, number, attempts)
            try:
                value = await invocation.task.fn(*args, **kwargs)
            except Exception as exc:
                return _try_failed(invocation.task_run_name, exc, number, attempts)
            return _final(invocation.task_run_name, value, attempts)
        return await _arun_body(invocation.task, invocation.task_run_name, args, kwargs)
    finally:
        current_flow_run.reset(token)


arun_task.__batch_key__ = _task_of  # type: ignore[attr-defined]


def _arguments(
    invocation: TaskInvocation, upstream: Optional[Dict[uuid.UUID, State[Any]]]
) -> Tuple[tuple, dict, Optional[State[Any]]]:
    if upstream is None:
        return invocation.args, invocation.kwargs, None
    return resolve_inputs(invocation.args, invocation.kwargs, upstream)


# -- the body, with its retries -------------------------------------------------------------


def _run_body(task: RunnableTask, task_run_name: str, args: tuple, kwargs: dict) -> State[Any]:
    fn: Callable[..., Any] = task.fn
    attempts = task.retries + 1
    if attempts == 1:
        _log_attempt(task_run_name, 1, 1)
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            return _failed(task_run_name, exc, 1)
        return _final(task_run_name, value, 1)
    retrying = _retrying(tenacity.Retrying, task, task_run_name, attempts)
    try:
        value = retrying(fn, *args, **kwargs)
    except Exception as exc:
        return _after_retries(task_run_name, exc, attempts)
    return _final(task_run_name, value, attempts)


async def _arun_body(
    task: RunnableTask, task_run_name: str, args: tuple, kwargs: dict
) -> State[Any]:
    fn: Callable[..., Any] = task.fn
    attempts = task.retries + 1
    if attempts == 1:
        _log_attempt(task_run_name, 1, 1)
        try:
            value = await fn(*args, **kwargs)
        except Exception as exc:
            return _failed(task_run_name, exc, 1)
        return _final(task_run_name, value, 1)
    retrying = _retrying(tenacity.AsyncRetrying, task, task_run_name, attempts)
    try:
        value = await retrying(fn, *args, **kwargs)
    except Exception as exc:
        return _after_retries(task_run_name, exc, attempts)
    return _final(task_run_name, value, attempts)


def _run_try(
    task: RunnableTask, task_run_name: str, args: tuple, kwargs: dict, attempt: Tuple[int, int]
) -> State[Any]:
    number, attempts = attempt
    _log_attempt(task_run_name, number, attempts)
    fn: Callable[..., Any] = task.fn
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:
        return _try_failed(task_run_name, exc, number, attempts)
    return _final(task_run_name, value, attempts)


def _try_failed(task_run_name: str, exc: Exception, number: int, attempts: int) -> State[Any]:
    if number == attempts:
        return _failed(task_run_name, exc, attempts)
    # Not the last try: the flow run logs the retry.
    return Failed(data=exc, message=f"raised {type(exc).__name__}: {exc}")


def _retrying(kind: type, task: RunnableTask, task_run_name: str, attempts: int) -> Any:
    # A body that raises, or returns a Failed state, is run again (as Prefect 2 did).
    options: Dict[str, Any] = {}
    if kind is tenacity.AsyncRetrying:
        options["sleep"] = anyio.sleep  # tenacity's default sleep would tie retries to asyncio
    return kind(
        stop=tenacity.stop_after_attempt(attempts),
        wait=_RetryDelays(task.retry_delay_seconds),
        retry=tenacity.retry_if_exception_type(Exception) | tenacity.retry_if_result(_is_failed),
        before=lambda state: _log_attempt(task_run_name, state.attempt_number, attempts),
        before_sleep=_log_retry(task_run_name, attempts),
        reraise=True,
        **options,
    )


class _RetryDelays(tenacity.wait.wait_base):
    """Seconds before each retry: one number for all, or a list (the last one repeats)."""

    def __init__(self, delays: Union[float, Sequence[float]]) -> None:
        self.delays = delays

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return _delay_before(self.delays, retry_state.attempt_number)


def _delay_before(delays: Union[float, Sequence[float]], retry: int) -> float:
    """Seconds before retry number ``retry`` (1 for the first)."""
    if isinstance(delays, (int, float)):
        return float(delays)
    return float(delays[min(retry, len(delays)) - 1])


def _is_failed(value: Any) -> bool:
    return isinstance(value, State) and value.is_failed()


def _log_attempt(task_run_name: str, number: int, attempts: int) -> None:
    if not task_logger.isEnabledFor(logging.DEBUG):  # the record's extra costs more
        return
    task_logger.debug(
        "Task run %r: attempt %d of %d.", task_run_name, number, attempts,
        extra={"task_run_name": task_run_name, "attempt": number},
    )


def _log_retry(task_run_name: str, attempts: int) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        number = retry_state.attempt_number
        outcome = retry_state.outcome
        assert outcome is not None, "tenacity sleeps only after an attempt"
        exc = outcome.exception()
        told = f"raised {type(exc).__name__}: {exc}" if exc else f"returned {outcome.result()!r}"
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        task_logger.warning(
            "Task run %r: attempt %d of %d %s; retrying in %g s.",
            task_run_name, number, attempts, told, delay,
            extra={"task_run_name": task_run_name, "attempt": number},
        )

    return before_sleep


def _failed(task_run_name: str, exc: Exception, attempts: int) -> State[Any]:
    after = f" after {attempts} attempts" if attempts > 1 else ""
    message = f"Task run {task_run_name!r} failed{after}: {type(exc).__name__}: {exc}"
    task_logger.error(message, extra={"task_run_name": task_run_name, "attempt": attempts})
    return Failed(data=exc, message=message)


def _final(task_run_name: str, value: Any, attempts: int) -> State[Any]:
    """The task run's State once its body returned ``value``: a State stands as it is."""
    if not isinstance(value, State):
        return State(StateType.COMPLETED, _COMPLETED, None, value)
    if value.is_failed():
        task_logger.error(
            "Task run %r returned %r.", task_run_name, value,
            extra={"task_run_name": task_run_name, "attempt": attempts},
        )
    return value


def _after_retries(task_run_name: str, exc: Exception, attempts: int) -> State[Any]:
    if isinstance(exc, tenacity.RetryError):  # every attempt returned a Failed state
        return _final(task_run_name, exc.last_attempt.result(), attempts)
    return _failed(task_run_name, exc, attempts)
