"""The machinery every blocking runner shares: start/stop, submission, waiting, pickling."""

from __future__ import annotations

import abc
import enum
import logging
import threading
from contextlib import contextmanager
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    TypeVar,
    cast,
    overload,
)

from taskrunners._collections import iter_leaves, visit_collection
from taskrunners._core.arguments import check_submission, is_future, may_hold_futures
from taskrunners._core.calls import (
    Call,
    Relay,
    CallHandle,
    block_until_done,
    state_of_done,
    wait_for_state,
    when_all_done,
)
from taskrunners._core.limits import check_timeout, with_limit
from taskrunners._core.remote.sharing import SharedValues
from taskrunners._core.remote.snapshots import Memo, shared_state, snapshot_call, snapshot_kwargs
from taskrunners._core.futures import PrefectFuture, RunFn, Sync, TaskRun
from taskrunners.states import State, exception_to_crashed_state

__all__ = [
    "TaskConcurrencyType",
    "NOT_STARTED",
    "BLOCK_ENDED",
    "RunnerIdentity",
    "BlockingTaskRunner",
]

T = TypeVar("T", bound="BlockingTaskRunner")
R = TypeVar("R")

#: Submitting to a runner that was never started.
NOT_STARTED = "The task runner must be started before submitting work."
#: Submitting to a runner whose start() block has ended.
BLOCK_ENDED = (
    "The task runner's start() block has ended: start it again (`with runner.start():`, or "
    "`async with runner.start():` for an async runner of `taskrunners`) before submitting work."
)


class TaskConcurrencyType(enum.Enum):
    """How a runner runs the calls it is given."""

    SEQUENTIAL = "SEQUENTIAL"
    CONCURRENT = "CONCURRENT"
    PARALLEL = "PARALLEL"


class RunnerIdentity:
    """The name, ``str()`` and logger every runner has, blocking twin or async facade."""

    _started: bool

    @property
    def name(self) -> str:
        """The class name, lower-cased, without "taskrunner"."""
        return type(self).__name__.lower().replace("taskrunner", "")

    def __str__(self) -> str:
        return type(self).__name__

    @property
    def is_started(self) -> bool:
        """Whether the runner is inside its ``start()`` block."""
        return self._started

    def _make_logger(self) -> logging.Logger:
        return logging.getLogger(f"task_runner.{self.name}")


def _async_with_refusal(runner: Any) -> TypeError:
    name = type(runner).__name__
    return TypeError(
        f"taskrunners.sync.{name} is a blocking runner: use `with runner.start() as r:` "
        f"(no `async`), or in async code the async runner taskrunners.{name} with "
        "`async with runner.start() as r:`."
    )


class _StartBlock:
    """What a blocking runner's ``start()`` returns: a context manager that refuses
    ``async with``."""

    __slots__ = ("_runner", "_manager")

    def __init__(self, runner: Any, manager: ContextManager[Any]) -> None:
        self._runner = runner
        self._manager = manager

    def __enter__(self) -> Any:
        return self._manager.__enter__()

    def __exit__(self, *exc_info: Any) -> Optional[bool]:
        return self._manager.__exit__(*exc_info)

    def __aenter__(self) -> None:
        raise _async_with_refusal(self._runner)

    def __aexit__(self, *exc_info: Any) -> None:
        """Never reached: :meth:`__aenter__` refuses."""


class BlockingTaskRunner(RunnerIdentity, abc.ABC):
    """Base class of the blocking twins in :mod:`taskrunners.sync`.

    A subclass opens its resources in :meth:`_open`, releases them in :meth:`_close`
    (after every call finished) or :meth:`_abort` (leaving the block with an
    exception), and runs one call in :meth:`_dispatch`, which returns a
    ``concurrent.futures.Future``-like handle whose result is the call's State.
    """

    #: Attributes holding pools, loops or clients: dropped when the runner is pickled.
    _handles: tuple = ()
    #: Whether a started runner, once unpickled, can still submit and wait.
    _usable_after_pickling = False
    #: Whether calls are sent to other processes after ``submit`` returns: their
    #: arguments are then taken as they are at submit (see ``remote.snapshots``).
    _snapshots_arguments = False
    #: Where large arguments are kept for the workers while the block runs (a runner
    #: that shares them sets it when its block starts: ``remote.sharing``).
    _shared: Optional[SharedValues] = None
    #: Whether a start() block of this runner has ended (submit then says so).
    _ended = False

    def __init__(self) -> None:
        self.logger = self._make_logger()
        self._started = False
        self._detached = False
        self._init_bookkeeping()

    def _init_bookkeeping(self) -> None:
        self._lifecycle_lock = threading.Lock()
        # Calls not finished yet: leaving the start() block waits for these. Finished
        # calls are held by their PrefectFutures only, so a State goes with its futures.
        self._pending: Set[CallHandle] = set()
        self._untrack = self._pending.discard  # made once: one object less per call

    @property
    @abc.abstractmethod
    def concurrency_type(self) -> TaskConcurrencyType:
        """How this runner runs calls."""

    # -- lifecycle ---------------------------------------------------------------

    def start(self: T) -> ContextManager[T]:
        """Start the runner for the duration of the block.

        Leaving the block normally waits for every submitted call. Leaving it with an
        exception cancels calls that have not started, stops what the runner owns
        without waiting for running threads, and re-raises the exception.

        :raises RuntimeError: if the runner is already started
        :raises TypeError: when used in ``async with`` (use ``with``, or the async
            runner of the same name from :mod:`taskrunners`)
        """
        return _StartBlock(self, self._block())

    @contextmanager
    def _block(self: T) -> Iterator[T]:
        self._begin()
        try:
            yield self
        except BaseException as exc:
            self._end(exc)
            raise
        self._end(None)

    def _begin(self) -> None:
        with self._lifecycle_lock:
            if self._started:
                raise RuntimeError("The task runner is already started!")
            self._started = True
        self.logger.debug("Starting task runner...")
        try:
            self._open()
        except BaseException:
            self._started = False
            raise

    def _end(self, exc: Optional[BaseException]) -> None:
        try:
            if exc is None:
                try:
                    self._drain()
                    self._close()
                except BaseException as interrupt:
                    self._abort(interrupt)
                    raise
            else:
                self._abort(exc)
        finally:
            self.logger.debug("Shutting down task runner...")
            self._started = False
            self._ended = True

    def _drain(self) -> None:
        while self._pending:
            block_until_done(list(self._pending))

    def _close_shared(self) -> None:
        """Release the large values kept for the block's calls (see ``remote.sharing``)."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()

    def _cancel_pending(self) -> None:
        self._cancel_unstarted(list(self._pending))

    def _cancel_unstarted(self, calls: Iterable[Any]) -> None:
        """Cancel each of these calls that has not started; running ones run on."""
        for call in calls:
            call.cancel()

    def _open(self) -> None:
        """Create the pools, loops or clients calls need."""

    def _close(self) -> None:
        """Release what :meth:`_open` created; every call has finished."""

    def _abort(self, exc: BaseException) -> None:
        """Release what :meth:`_open` created, now: the block is left with ``exc``."""
        self._cancel_pending()
        self._close()

    # -- submission ----------------------------------------------------------------

    def submit(
        self,
        task_run: TaskRun,
        run_fn: RunFn[R],
        run_kwargs: Mapping[str, Any],
        *,
        timeout_seconds: Optional[float] = None,
    ) -> PrefectFuture[R, Sync]:
        """Submit ``run_fn(**run_kwargs)``; returns a blocking :class:`PrefectFuture`.

        Futures anywhere in ``run_kwargs`` reach ``run_fn`` as their final States.

        :param timeout_seconds: the most seconds the call may run (from its start, not
            from submit); past it the work is stopped and the State is Failed, named
            "TimedOut" (its ``result()`` raises TimeoutError). None: no limit
        :raises RuntimeError: if the runner is not started
        :raises TypeError: if ``run_fn`` is not callable or ``run_kwargs`` not a
            mapping, or ``timeout_seconds`` not a number
        :raises ValueError: if ``timeout_seconds`` is not positive
        """
        if type(run_kwargs) is dict and callable(run_fn):
            kwargs = run_kwargs
        else:
            check_submission(run_fn, run_kwargs)
            kwargs = dict(run_kwargs)
        if timeout_seconds is not None:
            run_fn = with_limit(run_fn, check_timeout(timeout_seconds, "timeout_seconds"))
        future: PrefectFuture[R, Sync] = PrefectFuture(task_run, self, asynchronous=False)
        future._call = self._submit_call(task_run, run_fn, kwargs)
        return future

    def _submit_call(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> Any:
        if not self._started or self._detached:
            self._ensure_usable("submit work")
        if self._snapshots_arguments:
            run_fn, run_kwargs = snapshot_call(run_fn, run_kwargs, sharing=self._shared)
        upstream = self._upstream_calls(run_kwargs)
        if upstream:
            call = self._dispatch_after(upstream, task_run, run_fn, run_kwargs)
        else:
            call = self._dispatch(task_run, run_fn, run_kwargs)
        self._track(call)
        return call

    def _submit_calls(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
        memo: Optional[Memo] = None,
    ) -> List[CallHandle]:
        """Submit many calls of one ``run_fn`` at once (``task.map``); their handles.

        ``memo``: the snapshots of calls submitted before with these (the earlier parts
        of one map), so that a value they share is taken once for all of them.
        """
        if not self._started or self._detached:
            self._ensure_usable("submit work")
        if self._snapshots_arguments:
            # Submitted together: a value the calls share is taken once for all of them.
            if memo is None:
                memo = Memo(self._shared)
            run_fn, _ = snapshot_call(run_fn, {}, memo)
            run_kwargs_list = [
                snapshot_kwargs(run_kwargs, memo, self._shared) for run_kwargs in run_kwargs_list
            ]
        calls: List[Optional[CallHandle]] = [None] * len(task_runs)
        ready: List[int] = []
        for index, (task_run, run_kwargs) in enumerate(zip(task_runs, run_kwargs_list)):
            upstream = self._upstream_calls(run_kwargs)
            if upstream:
                calls[index] = self._dispatch_after(upstream, task_run, run_fn, run_kwargs)
            else:
                ready.append(index)
        if ready:
            started = self._dispatch_many(
                [task_runs[i] for i in ready], run_fn, [run_kwargs_list[i] for i in ready]
            )
            for index, call in zip(ready, started):
                calls[index] = call
        handles = cast(List[CallHandle], calls)
        for call in handles:
            self._track(call)
        return handles

    @abc.abstractmethod
    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> Any:
        """Start one call whose arguments hold no futures; return its handle."""

    def _dispatch_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
    ) -> List[CallHandle]:
        """Start many calls of one ``run_fn`` whose arguments hold no futures."""
        return [
            self._dispatch(task_run, run_fn, run_kwargs)
            for task_run, run_kwargs in zip(task_runs, run_kwargs_list)
        ]

    def _track(self, call: Any) -> None:
        self._pending.add(call)
        call.add_done_callback(self._untrack)

    def _upstream_calls(self, run_kwargs: Dict[str, Any]) -> List[Any]:
        if not run_kwargs or not any(map(may_hold_futures, run_kwargs.values())):
            return []
        return [self._call_of(future) for future in iter_leaves(run_kwargs, is_future)]

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> Call:
        """Start a call once its upstream calls are done, holding no worker meanwhile."""
        call = Relay()

        def start() -> None:
            if call.done():  # cancelled while waiting
                return
            try:
                started = self._dispatch(task_run, run_fn, self._resolve_futures(run_kwargs))
            except BaseException as exc:
                call.set_result(exception_to_crashed_state(exc))
                return
            call.started = started
            if call.done():  # cancelled meanwhile: so is the call it became, if it can be
                started.cancel()
            started.add_done_callback(lambda done: call.set_result(state_of_done(done)))

        when_all_done(upstream, start)
        return call

    def _resolve_futures(self, expr: Any) -> Any:
        """Replace every future inside ``expr`` with its final State (all are done); a
        large result goes to the workers once (see ``remote.sharing``)."""
        shared = self._shared

        def resolve(value: Any) -> Any:
            if not is_future(value):
                return value
            state = state_of_done(self._call_of(value))
            return state if shared is None else shared_state(state, shared)

        return visit_collection(expr, resolve)

    # -- waiting -------------------------------------------------------------------

    @overload
    def wait(self, future: PrefectFuture[R], timeout: None = None) -> State[R]: ...

    @overload
    def wait(self, future: PrefectFuture[R], timeout: Optional[float]) -> Optional[State[R]]: ...

    def wait(self, future: PrefectFuture[Any], timeout: Optional[float] = None) -> Optional[State]:
        """Block until the call is done and return its State, or None after ``timeout``.

        Whatever the call did comes back as a State; only misuse raises.
        """
        return self._wait_blocking(future, timeout)

    def _wait_blocking(self, future: PrefectFuture, timeout: Optional[float]) -> Optional[State]:
        call = future._call
        if call is None or self._detached:
            call = self._call_of(future)
        return wait_for_state(call, timeout)

    def _call_of(self, future: PrefectFuture, action: str = "wait for work") -> Any:
        self._ensure_attached(action)
        call = future._call
        if call is None:
            raise RuntimeError(
                f"No call for task run {future.task_run.name!r} ({future.run_id}) is "
                f"known to {self}: wait for the future that submit() returned."
            )
        return call

    def _ensure_usable(self, action: str) -> None:
        if not self._started:
            raise self._not_started()
        self._ensure_attached(action)

    def _not_started(self) -> RuntimeError:
        """The error for work submitted outside a start() block."""
        return RuntimeError(BLOCK_ENDED if self._ended else NOT_STARTED)

    def _ensure_attached(self, action: str) -> None:
        if self._detached:
            raise RuntimeError(
                f"The {self.name} task runner cannot be used to {action} after "
                "serialization."
            )

    # -- misuse ----------------------------------------------------------------------

    if not TYPE_CHECKING:  # so that a type checker still reports `with runner:`

        def __enter__(self):
            raise TypeError(
                f"taskrunners.sync.{type(self).__name__} is not a context manager itself: "
                "use `with runner.start() as r:`, which starts the runner for the block "
                "and stops it after."
            )

        def __exit__(self, *exc_info):
            """Never reached: :meth:`__enter__` refuses."""

        def __aenter__(self):
            raise _async_with_refusal(self)

        def __aexit__(self, *exc_info):
            """Never reached: :meth:`__aenter__` refuses."""

    # -- pickling --------------------------------------------------------------------

    def __getstate__(self) -> Dict[str, Any]:
        data = self.__dict__.copy()
        for name in ("_lifecycle_lock", "_pending", "_untrack", *self._handles):
            data[name] = None
        data["_detached"] = self._started and not self._usable_after_pickling
        return data

    def __setstate__(self, data: Dict[str, Any]) -> None:
        self.__dict__.update(data)
        self._init_bookkeeping()
