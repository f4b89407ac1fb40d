"""The async facade: Prefect 2's ``start()`` / ``submit()`` / ``wait()`` on asyncio and trio.

Each runner here wraps its blocking twin from :mod:`taskrunners.sync` and holds no
scheduling logic of its own, except that a coroutine ``run_fn`` given to an
in-process runner (Sequential, Concurrent) runs on the caller's event loop.

>>> import anyio
>>> from taskrunners import ConcurrentTaskRunner, TaskRun
>>> from taskrunners.states import Completed
>>> async def double(x):
...     return Completed(data=x * 2)
>>> async def main():
...     async with ConcurrentTaskRunner().start() as runner:
...         future = await runner.submit(TaskRun(), double, {"x": 21})
...         return (await runner.wait(future)).result()
>>> anyio.run(main)
42
"""

from __future__ import annotations

import abc
from contextlib import AsyncExitStack
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    ContextManager,
    Dict,
    Generic,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
    Union,
    overload,
)

import anyio
from typing_extensions import Literal

from taskrunners import sync
from taskrunners._core import seam
from taskrunners._core.seam import (
    DEFAULT_LARGE_VALUE_BYTES,
    Async,
    BatchSize,
    BlockingTaskRunner,
    Call,
    CallHandle,
    PrefectFuture,
    RunFn,
    RunnerIdentity,
    Sync,
    TaskConcurrencyType,
    TaskRun,
    check_submission,
    checked_state,
    interrupted_since,
    is_coroutine_function,
    sigint_watch,
)
from taskrunners._facade_docs import facade_doc
from taskrunners._start_block import start_block, unwrapped_interrupt
from taskrunners.states import State, exception_to_crashed_state

__all__ = [
    "TaskConcurrencyType",
    "BaseTaskRunner",
    "SequentialTaskRunner",
    "ConcurrentTaskRunner",
    "ParallelTaskRunner",
    "DaskTaskRunner",
    "RayTaskRunner",
]

T = TypeVar("T", bound="BaseTaskRunner")
C = TypeVar("C", bound=BlockingTaskRunner)
F = TypeVar("F", bound="_FacadeRunner[Any]")
R = TypeVar("R")


class BaseTaskRunner(RunnerIdentity, metaclass=abc.ABCMeta):
    """Prefect 2's async task runner interface.

    Subclasses implement :attr:`concurrency_type`, :meth:`submit` and :meth:`wait`,
    and prepare resources in :meth:`_start`, pushing their cleanup onto the exit stack.
    """

    def __init__(self) -> None:
        self.logger = self._make_logger()
        self._started = False

    @property
    @abc.abstractmethod
    def concurrency_type(self) -> TaskConcurrencyType:
        """How this runner runs calls."""

    @abc.abstractmethod
    async def submit(
        self,
        task_run: TaskRun,
        run_fn: RunFn[R],
        run_kwargs: Mapping[str, Any],
        asynchronous: bool = True,
        *,
        timeout_seconds: Optional[float] = None,
    ) -> PrefectFuture[R]:
        """Submit ``run_fn(**run_kwargs)`` and return a future for its State; past
        ``timeout_seconds`` of running, the call is stopped and its State is TimedOut."""

    @overload
    async def wait(self, prefect_future: PrefectFuture[R], timeout: None = None) -> State[R]: ...

    @overload
    async def wait(
        self, prefect_future: PrefectFuture[R], timeout: Optional[float]
    ) -> Optional[State[R]]: ...

    @abc.abstractmethod
    async def wait(
        self, prefect_future: PrefectFuture[Any], timeout: Optional[float] = None
    ) -> Optional[State]:
        """The future's final State, or None if ``timeout`` seconds pass first."""

    @start_block
    async def start(self: T) -> AsyncIterator[T]:
        """Start the runner for the duration of the block.

        :raises RuntimeError: if the runner is already started
        :raises TypeError: when used in a plain ``with`` (use ``async with``)
        """
        if self._started:
            raise RuntimeError("The task runner is already started!")
        async with AsyncExitStack() as exit_stack:
            self.logger.debug("Starting task runner...")
            try:
                await self._start(exit_stack)
                self._started = True
                yield self
            finally:
                self.logger.debug("Shutting down task runner...")
                self._started = False

    async def _start(self, exit_stack: AsyncExitStack) -> None:
        """Create what calls need; push its cleanup onto ``exit_stack``."""

    if not TYPE_CHECKING:  # so that a type checker still reports `async with runner:`

        def __aenter__(self):
            raise TypeError(
                f"{type(self).__name__} is not a context manager itself: use `async with "
                "runner.start() as r:`, which starts the runner for the block and stops "
                "it after."
            )

        def __aexit__(self, *exc_info):
            """Never reached: :meth:`__aenter__` refuses."""

        def __enter__(self):
            name = type(self).__name__
            raise TypeError(
                f"{name} is an async runner: use `async with runner.start() as r:` in "
                f"async code, or the blocking twin taskrunners.sync.{name} with `with "
                "runner.start() as r:`."
            )

        def __exit__(self, *exc_info):
            """Never reached: :meth:`__enter__` refuses."""


class _FacadeRunner(BaseTaskRunner, Generic[C]):
    """A facade over one blocking twin (``_core``), which does the scheduling."""

    # Whether coroutine calls run on the caller's event loop (in-process runners).
    _coroutines_on_caller_loop = False
    # Whether calls run in the caller's thread, where a Ctrl-C lands (in-process runners).
    _watches_sigint = False

    def __init__(self, core: C) -> None:
        self._core: C = core
        self._task_group: Optional[anyio.abc.TaskGroup] = None
        super().__init__()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return self._core.concurrency_type

    @start_block
    async def start(self: F) -> AsyncIterator[F]:
        """Start the runner for the duration of the block.

        Leaving the block normally waits for every submitted call. Leaving it with an
        exception cancels calls not started and running coroutine calls, stops the
        workers the runner owns without waiting for running threads, and re-raises
        that exception unchanged.

        :raises RuntimeError: if the runner is already started
        :raises TypeError: when used in a plain ``with`` (use ``async with``, or the
            blocking twin from :mod:`taskrunners.sync`)
        """
        if self._started:
            raise RuntimeError("The task runner is already started!")
        block = self._core.start()
        await anyio.to_thread.run_sync(block.__enter__)
        self._started = True
        watching = self._watches_sigint and sigint_watch.install()
        failure: Optional[BaseException] = None
        try:
            try:
                async with anyio.create_task_group() as task_group:
                    self._task_group = task_group
                    try:
                        yield self
                        await self._drain()
                    except BaseException as exc:
                        # Kept out of the task group, so it is never wrapped in a group.
                        failure = exc
                        task_group.cancel_scope.cancel()
            except BaseException as exc:
                if failure is None:
                    # A Ctrl-C raised in a coroutine call reaches us wrapped in a group.
                    interrupt = unwrapped_interrupt(exc)
                    if interrupt is exc:
                        raise
                    raise interrupt from None
        finally:
            if watching:
                sigint_watch.uninstall()
            self._task_group = None
            self._started = False
            # Shielded: an outer cancellation must not leave workers running.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_leave_block, block, failure)
        if failure is not None:
            raise failure

    async def _drain(self) -> None:
        await seam.drain(self._core)

    @overload
    async def submit(
        self,
        task_run: TaskRun,
        run_fn: RunFn[R],
        run_kwargs: Mapping[str, Any],
        asynchronous: Literal[True] = True,
        *,
        timeout_seconds: Optional[float] = None,
    ) -> PrefectFuture[R, Async]: ...

    @overload
    async def submit(
        self,
        task_run: TaskRun,
        run_fn: RunFn[R],
        run_kwargs: Mapping[str, Any],
        asynchronous: Literal[False],
        *,
        timeout_seconds: Optional[float] = None,
    ) -> PrefectFuture[R, Sync]: ...

    @overload
    async def submit(
        self,
        task_run: TaskRun,
        run_fn: RunFn[R],
        run_kwargs: Mapping[str, Any],
        asynchronous: bool = True,
        *,
        timeout_seconds: Optional[float] = None,
    ) -> PrefectFuture[R]: ...

    async def submit(
        self,
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Mapping[str, Any],
        asynchronous: bool = True,
        *,
        timeout_seconds: Optional[float] = None,
    ) -> PrefectFuture[Any]:
        """Submit ``run_fn(**run_kwargs)`` and return a future for its State.

        Futures anywhere in ``run_kwargs`` reach ``run_fn`` as their final States.

        :param asynchronous: whether the future's ``wait()`` and ``result()`` are
            awaited (the default) or block
        :param timeout_seconds: the most seconds the call may run (from its start, not
            from submit); past it the work is stopped and the State is Failed, named
            "TimedOut" (its ``result()`` raises TimeoutError). None: no limit
        :raises RuntimeError: if the runner is not started, or was unpickled
        :raises TypeError: if ``run_fn`` is not callable or ``run_kwargs`` not a
            mapping, or ``timeout_seconds`` not a number
        :raises ValueError: if ``timeout_seconds`` is not positive
        """
        check_submission(run_fn, run_kwargs)
        if timeout_seconds is not None:
            run_fn = seam.with_limit(run_fn, seam.check_timeout(timeout_seconds, "timeout_seconds"))
        if self._coroutines_on_caller_loop and is_coroutine_function(run_fn):
            # The task group sees these calls to their end: no tracking needed.
            call = await self._start_coroutine_call(task_run, run_fn, _as_dict(run_kwargs))
            return seam.future_for(call, task_run, self, asynchronous)
        return seam.submit(self._core, task_run, run_fn, _as_dict(run_kwargs), self, asynchronous)

    async def _start_coroutine_call(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> Call:
        upstream = seam.admit_coroutine_call(self._core, run_kwargs)
        if self._task_group is None:  # unpickled: the task group stayed behind
            raise RuntimeError(
                f"The {self.name} task runner cannot be used to submit work after serialization."
            )
        call = Call()
        self._task_group.start_soon(
            self._run_coroutine_call, call, upstream, task_run, run_fn, run_kwargs
        )
        return call

    async def _run_coroutine_call(
        self,
        call: Call,
        upstream: List[CallHandle],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> None:
        try:
            run_kwargs = await seam.resolved(self._core, run_kwargs, upstream)
        except BaseException as exc:  # cancelled while waiting: it never ran
            call.set_result(exception_to_crashed_state(exc))
            raise
        await _await_call(call, task_run, run_fn, run_kwargs)

    @overload
    async def wait(self, prefect_future: PrefectFuture[R], timeout: None = None) -> State[R]: ...

    @overload
    async def wait(
        self, prefect_future: PrefectFuture[R], timeout: Optional[float]
    ) -> Optional[State[R]]: ...

    async def wait(
        self, prefect_future: PrefectFuture[Any], timeout: Optional[float] = None
    ) -> Optional[State]:
        """The future's final State, or None if ``timeout`` seconds pass first.

        Whatever the call did comes back as a State; waiting holds no thread.

        :raises RuntimeError: if the runner was unpickled and cannot reach its calls
        """
        return await seam.state_when_done(prefect_future, timeout, self._core)

    def _call_of(self, future: PrefectFuture[Any]) -> CallHandle:
        """The handle of ``future``'s call, as the core sees it (a future asks this when
        it holds none)."""
        return seam.call_of(future, self._core)

    def __getstate__(self) -> Dict[str, Any]:
        data = self.__dict__.copy()
        data["_task_group"] = None
        return data

    def __setstate__(self, data: Dict[str, Any]) -> None:
        self.__dict__.update(data)


async def _await_call(
    call: Call, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
) -> None:
    """Await a coroutine call on the caller's event loop and set its State.

    Whatever the call raises, it ends Crashed. A cancellation of the caller (asyncio's
    answer to Ctrl-C among them) and a Ctrl-C itself then go on, so the script stops;
    a KeyboardInterrupt the call raised on its own does not. A call with a time limit
    is cancelled once it passes, and is TimedOut.
    """
    signals = sigint_watch.signals if sigint_watch.watching else None
    run_fn, seconds = seam.split_limit(run_fn)
    try:
        if seconds is not None:
            with anyio.move_on_after(seconds) as scope:
                value = await run_fn(**run_kwargs)
            if scope.cancelled_caught:
                call.set_result(seam.timed_out_state(task_run.name, seconds))
                return
        else:
            value = await run_fn(**run_kwargs)
    except BaseException as exc:
        call.set_result(exception_to_crashed_state(exc))
        if isinstance(exc, anyio.get_cancelled_exc_class()) or interrupted_since(signals):
            raise
        return
    call.set_result(checked_state(run_fn, value))


def _leave_block(block: ContextManager[Any], failure: Optional[BaseException]) -> None:
    """Leave a core's ``start()`` block: normally, or with ``failure``."""
    if failure is None:
        block.__exit__(None, None, None)
    else:
        block.__exit__(type(failure), failure, failure.__traceback__)


def _as_dict(run_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    return run_kwargs if type(run_kwargs) is dict else dict(run_kwargs)


class SequentialTaskRunner(_FacadeRunner[sync.SequentialTaskRunner]):
    __doc__ = facade_doc(
        sync.SequentialTaskRunner,
        """
        Here coroutine calls run on the caller's event loop, not on a loop thread: one
        after another too, unless the caller starts the submissions concurrently (an
        anyio task group, ``asyncio.gather``). Plain calls run inside ``submit``.
        """,
    )

    _coroutines_on_caller_loop = True
    _watches_sigint = True

    def __init__(self) -> None:
        super().__init__(sync.SequentialTaskRunner())

    async def _start_coroutine_call(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> Call:
        upstream = seam.admit_coroutine_call(self._core, run_kwargs)
        call = Call()
        await _await_call(call, task_run, run_fn, await seam.resolved(self._core, run_kwargs, upstream))
        return call


class ConcurrentTaskRunner(_FacadeRunner[sync.ConcurrentTaskRunner]):
    __doc__ = facade_doc(
        sync.ConcurrentTaskRunner,
        "Here coroutine calls run concurrently on the caller's event loop, not on a loop\n"
        "thread; plain calls run on threads.",
    )

    _coroutines_on_caller_loop = True
    _watches_sigint = True

    max_workers = sync.ConcurrentTaskRunner.max_workers.forwarded()

    def __init__(self, max_workers: Optional[int] = None) -> None:
        super().__init__(sync.ConcurrentTaskRunner(max_workers))


class ParallelTaskRunner(_FacadeRunner[sync.ParallelTaskRunner]):
    __doc__ = facade_doc(sync.ParallelTaskRunner)

    max_workers = sync.ParallelTaskRunner.max_workers.forwarded()
    initializer = sync.ParallelTaskRunner.initializer.forwarded()
    initargs = sync.ParallelTaskRunner.initargs.forwarded()
    env = sync.ParallelTaskRunner.env.forwarded()
    batch_size = sync.ParallelTaskRunner.batch_size.forwarded()
    large_value_bytes = sync.ParallelTaskRunner.large_value_bytes.forwarded()
    max_calls_per_worker = sync.ParallelTaskRunner.max_calls_per_worker.forwarded()
    worker_memory_limit = sync.ParallelTaskRunner.worker_memory_limit.forwarded()

    def __init__(
        self,
        max_workers: Optional[int] = None,
        *,
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Tuple[Any, ...] = (),
        env: Optional[Mapping[str, str]] = None,
        batch_size: BatchSize = "auto",
        large_value_bytes: Optional[int] = DEFAULT_LARGE_VALUE_BYTES,
        max_calls_per_worker: Optional[int] = None,
        worker_memory_limit: Union[int, str, None] = None,
    ) -> None:
        super().__init__(
            sync.ParallelTaskRunner(
                max_workers,
                initializer=initializer,
                initargs=initargs,
                env=env,
                batch_size=batch_size,
                large_value_bytes=large_value_bytes,
                max_calls_per_worker=max_calls_per_worker,
                worker_memory_limit=worker_memory_limit,
            )
        )


class DaskTaskRunner(_FacadeRunner[sync.DaskTaskRunner]):
    __doc__ = facade_doc(sync.DaskTaskRunner)

    address = sync.DaskTaskRunner.address.forwarded()
    cluster_class = sync.DaskTaskRunner.cluster_class.forwarded()
    cluster_kwargs = sync.DaskTaskRunner.cluster_kwargs.forwarded()
    adapt_kwargs = sync.DaskTaskRunner.adapt_kwargs.forwarded()
    client_kwargs = sync.DaskTaskRunner.client_kwargs.forwarded()
    connect_timeout = sync.DaskTaskRunner.connect_timeout.forwarded()
    batch_size = sync.DaskTaskRunner.batch_size.forwarded()
    large_value_bytes = sync.DaskTaskRunner.large_value_bytes.forwarded()

    def __init__(
        self,
        address: Optional[str] = None,
        cluster_class: Union[str, Callable[..., Any], None] = None,
        cluster_kwargs: Optional[Dict[str, Any]] = None,
        adapt_kwargs: Optional[Dict[str, Any]] = None,
        client_kwargs: Optional[Dict[str, Any]] = None,
        connect_timeout: float = 30.0,
        *,
        batch_size: BatchSize = "auto",
        large_value_bytes: Optional[int] = DEFAULT_LARGE_VALUE_BYTES,
    ) -> None:
        super().__init__(
            sync.DaskTaskRunner(
                address, cluster_class, cluster_kwargs, adapt_kwargs, client_kwargs,
                connect_timeout, batch_size=batch_size, large_value_bytes=large_value_bytes,
            )
        )


class RayTaskRunner(_FacadeRunner[sync.RayTaskRunner]):
    __doc__ = facade_doc(sync.RayTaskRunner)

    address = sync.RayTaskRunner.address.forwarded()
    init_kwargs = sync.RayTaskRunner.init_kwargs.forwarded()
    remote_options = sync.RayTaskRunner.remote_options.forwarded()
    batch_size = sync.RayTaskRunner.batch_size.forwarded()
    large_value_bytes = sync.RayTaskRunner.large_value_bytes.forwarded()

    def __init__(
        self,
        address: Optional[str] = None,
        init_kwargs: Optional[Dict[str, Any]] = None,
        *,
        remote_options: Optional[Dict[str, Any]] = None,
        batch_size: BatchSize = "auto",
        large_value_bytes: Optional[int] = DEFAULT_LARGE_VALUE_BYTES,
    ) -> None:
        super().__init__(
            sync.RayTaskRunner(
                address, init_kwargs, remote_options=remote_options, batch_size=batch_size,
                large_value_bytes=large_value_bytes,
            )
        )
