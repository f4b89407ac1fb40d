"""Tasks: ``@task``, :class:`Task`, :meth:`Task.map` with :class:`unmapped`, and retries.

Inside a flow, calling a task submits one task run to the flow's runner (the flow
run is found in :mod:`taskrunners._flow_engine`); outside a flow it is a plain
function call. How a task run is submitted, what it carries to the runner and how
its body runs there with its retries is in :mod:`taskrunners._task_runs`.

>>> from taskrunners import task
>>> @task
... def double(x):
...     return 2 * x
>>> double(21)  # outside a flow
42
"""

from __future__ import annotations

import functools
import itertools
from typing import (
    Any,
    Callable,
    Coroutine,
    Dict,
    Generic,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from typing_extensions import ParamSpec

from taskrunners._core import seam
from taskrunners._flow_engine import Decorated, FlowRun, current_flow_run
from taskrunners._task_runs import asubmit_task, submit_mapped, submit_task
from taskrunners.futures import Async, PrefectFuture, Sync
from taskrunners.states import State

__all__ = ["Task", "task", "unmapped"]

P = ParamSpec("P")
# Covariant, so that an async function's coroutine (CoroutineType, to pyright) fits
# the overloads' Coroutine.
R = TypeVar("R", covariant=True)
T = TypeVar("T")


class Task(Decorated[P], Generic[P, R]):
    """A function that a flow runs on its task runner; made by :func:`task`.

    Type checkers see a task's parameters (``P``) as its function's, so a wrong
    argument name or type is reported; ``R`` is what the function returns. They read
    a call as made inside a flow: a task of a function returning ``X`` gives a
    ``PrefectFuture[X, Sync]``; of an ``async`` one, a coroutine giving a
    ``PrefectFuture[X, Async]`` (what an async flow awaits); a returned ``State[X]``
    counts as ``X``. At run time, a call outside a flow returns the function's value
    (``task.fn(...)`` is typed so), and a task called in a flow of the other kind
    gives a future of that flow's mode. A future passed for an argument reaches the
    body as its data, but type checkers see a future where the function's type is
    expected.

    :param fn: the function, plain or ``async``
    :param name: the task's name; defaults to the function's name
    :param retries: how many times to run the body again after it raised an ``Exception``
    :param retry_delay_seconds: seconds to wait before each retry: one number, or a list
        of delays for successive retries (the last one repeats)
    :param timeout_seconds: the most seconds one try of a run may run on its runner;
        past it the work is stopped and the try is Failed, named "TimedOut" (retried
        like any failed try, with a fresh limit). None: no limit
    :raises TypeError: if ``fn`` is not callable, or ``timeout_seconds`` not a number
    :raises ValueError: for a negative or non-integer ``retries``, a bad delay, or a
        ``timeout_seconds`` that is not positive
    """

    kind = "Task"
    fn: Callable[P, R]

    def __init__(
        self,
        fn: Callable[P, R],
        name: Optional[str] = None,
        retries: int = 0,
        retry_delay_seconds: Union[float, Sequence[float]] = 0,
        timeout_seconds: Optional[float] = None,
    ) -> None:
        super().__init__(fn, name)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(
                f"`retries` must be an integer >= 0, got {retries!r}; e.g. @task(retries=3)."
            )
        self.retries = retries
        self.retry_delay_seconds = _checked_delays(retry_delay_seconds)
        self.timeout_seconds = seam.check_timeout(timeout_seconds, "timeout_seconds")

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, fn={self.fn!r})"

    # Inside a flow, a call gives a future of the function's value (of a returned
    # State's data). The first overload that fits wins: an untyped function's (Any)
    # fits the first, a blocking future of Any.
    @overload
    def __call__(
        self: Task[P, State[T]], *args: P.args, **kwargs: P.kwargs
    ) -> PrefectFuture[T, Sync]: ...

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self: Task[P, Coroutine[Any, Any, State[T]]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, PrefectFuture[T, Async]]: ...

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self: Task[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, PrefectFuture[T, Async]]: ...

    @overload
    def __call__(self: Task[P, T], *args: P.args, **kwargs: P.kwargs) -> PrefectFuture[T, Sync]: ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Submit the task inside a flow; call the function outside one.

        Inside a flow this returns a :class:`PrefectFuture` (in an async flow, an
        async task's call is awaited to get it). Outside a flow it returns what the
        function returns.
        """
        flow_run = current_flow_run.get()
        if flow_run is None:
            return self.fn(*args, **kwargs)
        return self._submit(flow_run, args, kwargs)

    @overload
    def submit(
        self: Task[P, State[T]], *args: P.args, **kwargs: P.kwargs
    ) -> PrefectFuture[T, Sync]: ...

    @overload
    def submit(  # type: ignore[overload-overlap]
        self: Task[P, Coroutine[Any, Any, State[T]]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, PrefectFuture[T, Async]]: ...

    @overload
    def submit(  # type: ignore[overload-overlap]
        self: Task[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, PrefectFuture[T, Async]]: ...

    @overload
    def submit(self: Task[P, T], *args: P.args, **kwargs: P.kwargs) -> PrefectFuture[T, Sync]: ...

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Submit the task to the current flow's runner; the explicit spelling of a call.

        :return: a :class:`PrefectFuture`; in an async flow an async task's submission
            is awaited to get it
        :raises RuntimeError: outside a flow
        """
        flow_run = current_flow_run.get()
        if flow_run is None:
            raise RuntimeError(
                f"Task {self.name!r} can only be submitted inside a flow: call it from a "
                f"function decorated with @flow, or call {self.name}(...) to run it here."
            )
        return self._submit(flow_run, args, kwargs)

    # Its arguments are iterables of the function's and unmapped(...) values: they
    # are checked when the runs are made, not by type checkers.
    @overload
    def map(
        self: Task[P, State[T]], *args: Any, **kwargs: Any
    ) -> List[PrefectFuture[T, Sync]]: ...

    @overload
    def map(  # pyright: ignore[reportOverlappingOverload]
        self: Task[P, Coroutine[Any, Any, State[T]]], *args: Any, **kwargs: Any
    ) -> Coroutine[Any, Any, List[PrefectFuture[T, Async]]]: ...

    @overload
    def map(
        self: Task[P, Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
    ) -> Coroutine[Any, Any, List[PrefectFuture[T, Async]]]: ...

    @overload
    def map(self: Task[P, T], *args: Any, **kwargs: Any) -> List[PrefectFuture[T, Sync]]: ...

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
        runs = _mapped_arguments(self.name, args, kwargs)
        first = next(runs, None)
        if first is not None:  # every run has the same arguments by name and position: check one
            self._check_arguments(*first)
            runs = itertools.chain((first,), runs)
        flow_run = current_flow_run.get()
        if flow_run is None:
            if self.isasync:
                return self._map_plain_async(runs)
            fn: Callable[..., Any] = self.fn
            return [fn(*a, **k) for a, k in runs]
        if flow_run.asynchronous and self.isasync:
            return self._map_async(flow_run, runs)
        return submit_mapped(flow_run, self, runs)

    async def _map_plain_async(self, runs: Iterator[Tuple[tuple, dict]]) -> List[Any]:
        fn: Callable[..., Any] = self.fn
        return [await fn(*a, **k) for a, k in runs]

    async def _map_async(
        self, flow_run: FlowRun, runs: Iterator[Tuple[tuple, dict]]
    ) -> List[PrefectFuture[Any]]:
        return [await asubmit_task(flow_run, self, a, k) for a, k in runs]

    def _submit(self, flow_run: FlowRun, args: tuple, kwargs: dict) -> Any:
        self._check_arguments(args, kwargs)
        if flow_run.asynchronous and self.isasync:
            return asubmit_task(flow_run, self, args, kwargs)
        return submit_task(flow_run, self, args, kwargs)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    name: Optional[str] = None,
    retries: int = 0,
    retry_delay_seconds: Union[float, Sequence[float]] = 0,
    timeout_seconds: Optional[float] = None,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Optional[Callable[..., Any]] = None,
    /,
    *,
    name: Optional[str] = None,
    retries: int = 0,
    retry_delay_seconds: Union[float, Sequence[float]] = 0,
    timeout_seconds: Optional[float] = None,
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
    :param timeout_seconds: the most seconds one try may run (from its start on the
        runner); past it the work is stopped and the try is Failed, named "TimedOut"
    :return: a :class:`Task`, or a decorator making one
    """
    options: Dict[str, Any] = dict(
        name=name,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        timeout_seconds=timeout_seconds,
    )
    if fn is None:
        seam.check_timeout(timeout_seconds, "timeout_seconds")  # at the decorator, not later
        return functools.partial(Task, **options)
    return Task(fn, **options)


def _checked_delays(delays: Any) -> Union[float, List[float]]:
    """``retry_delay_seconds`` as given, or as a list; refused with the fix if invalid."""
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


# -- map ----------------------------------------------------------------------------------


class unmapped:
    """Marks an argument of :meth:`Task.map` as constant: each run gets it whole.

    :param value: the argument every mapped run receives
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"unmapped({self.value!r})"


def _mapped_arguments(name: str, args: tuple, kwargs: dict) -> Iterator[Tuple[tuple, dict]]:
    """The arguments of each mapped run: the iterables zipped, ``unmapped`` values whole.

    The iterables are read (and checked) at once; each run's arguments are made as
    they are taken, so that a long map does not hold them all at once.
    """

    def describe(key: Union[int, str]) -> str:
        return f"positional argument {key}" if isinstance(key, int) else f"argument {key!r}"

    mapped: Dict[Union[int, str], Sequence[Any]] = {}
    for key, value in itertools.chain(enumerate(args), kwargs.items()):
        if isinstance(value, unmapped):
            continue
        if isinstance(value, (PrefectFuture, State)):
            raise TypeError(
                f"{name}.map() cannot map over {describe(key)}, a {type(value).__name__}: "
                "pass its data (`future.result()`, awaited in an async flow), or wrap it in "
                "unmapped(...) to give it whole to every run."
            )
        if type(value) in (list, tuple, range):  # read in order, here: no copy needed
            mapped[key] = value
            continue
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

    count = lengths.pop()

    def column(key: Union[int, str], value: Any) -> Iterable[Any]:
        return mapped[key] if key in mapped else itertools.repeat(value.value, count)

    arg_rows = zip(*(column(key, value) for key, value in enumerate(args))) if args else None
    names = list(kwargs)
    kwarg_rows = zip(*(column(key, kwargs[key]) for key in names)) if names else None
    if kwarg_rows is None:
        return zip(arg_rows, itertools.repeat(_NO_KWARGS))  # type: ignore[arg-type]
    kwarg_dicts = map(dict, map(functools.partial(zip, names), kwarg_rows))
    return zip(arg_rows if arg_rows is not None else itertools.repeat((), count), kwarg_dicts)


# The keyword arguments of a mapped run that has none: one dict for all, never changed
# (a run's body gets its own, from ``**``).
_NO_KWARGS: Dict[str, Any] = {}
