"""The blocking ParallelTaskRunner: calls in loky worker processes, in batches.

How a call travels::

    submit()           a call handle, and an entry for the dispatcher (batching.py):
       │               it goes out at once while fewer batches are out than loky's
       │               call queue holds, else it is gathered with the calls of its
       │               task, where it can still be cancelled
       ▼
    the dispatcher     sends a batch: alone, or as many gathered calls of one task as
    sends a batch      take about 0.1 s, when a batch comes back or somebody waits
       │               for one of them; on that thread (the submitting, the waiting
       │               or loky's manager thread) the calls are marked running and
       │               pickled together, once (an unpicklable call is Crashed alone)
       ▼
    loky's manager     in place of a batch just settled (or the feeder thread, when
    thread, or the     a worker has room): a slot per call in the pool's slot table,
    feeder thread      then run_batch_call() is submitted to that worker's executor
       │
       ▼
    loky ──▶ worker    (one loky executor per worker: a death or a recycling ends
       │               that one only) run_batch_call() runs the calls in order, marking each one
       │               started and finished in its slot, and pickles their States,
       │               durations and log records together
       ▼
    loky's manager     the records go to this process's loggers, the durations size
    thread             the next batches of the task, each State settles its call;
                       after a break, the slot table tells, call by call, which
                       started (Crashed), which finished (Crashed: the result was
                       lost with the batch) and which never did (gathered again, for
                       another worker)

Modules: this one holds the public class; :mod:`~taskrunners._core.parallel.pool`
the pool and the hazards it handles; :mod:`~taskrunners._core.parallel.calls` the
call handles and how a batch is pickled; :mod:`~taskrunners._core.parallel.generation`
one worker in a loky executor of its own; :mod:`~taskrunners._core.parallel.crashes` the
Crashed states and their messages; :mod:`~taskrunners._core.parallel.worker` what
runs in the workers; :mod:`~taskrunners._core.parallel.loky_private` what is read of loky
beyond its public API.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import loky

from taskrunners._core.arguments import check_max_workers
from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType
from taskrunners._core.batching import BatchSize, check_batch_size
from taskrunners._core.calls import CallHandle
from taskrunners._core.parallel.pool import ProcessPool
from taskrunners._core.parallel.recycling import (
    check_max_calls_per_worker,
    check_worker_memory_limit,
)
from taskrunners._core.parallel.shared_files import SharedFiles
from taskrunners._core.remote.sharing import DEFAULT_LARGE_VALUE_BYTES, check_large_value_bytes
from taskrunners._core.settings import BATCH_SIZE_DOC, LARGE_VALUE_BYTES_DOC, Setting
from taskrunners._core.futures import TaskRun

__all__ = ["ParallelTaskRunner"]


class ParallelTaskRunner(BlockingTaskRunner):
    """Runs calls in parallel in loky worker processes on this machine.

    >>> from taskrunners.states import Completed
    >>> with ParallelTaskRunner(max_workers=2).start() as runner:
    ...     future = runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {"x": 21})
    ...     runner.wait(future).result()
    42

    :param max_workers: the number of worker processes; None for the number of CPUs
        this process may use
    :param initializer: called as ``initializer(*initargs)`` in each worker process
        when it starts
    :param initargs: the arguments of ``initializer``
    :param env: environment variables to set in the worker processes
    :param batch_size: calls per loky task: ``"auto"`` gathers calls of one task while
        every worker is busy, as many as take about 0.1 s; a number fixes the size
    :param large_value_bytes: an argument that pickles to this many bytes or more
        (numpy arrays, bytes, a big dict) goes to each worker once, through a file in
        shared memory, however many calls take it; None sends it with every call
    :param max_calls_per_worker: a worker process is replaced, between calls, after
        running this many calls; None keeps it
    :param worker_memory_limit: a worker process whose resident memory is above this
        after a call is replaced before it takes another: bytes, or a string such as
        ``"200MB"``, ``"2GB"`` or ``"1.5GiB"``; None for no limit
    :raises ValueError: if ``max_workers`` is not a positive integer or None, ``env``
        is not a mapping of strings to strings, ``batch_size`` is neither "auto" nor
        a positive integer, ``max_calls_per_worker`` is not a positive integer or
        None, or ``worker_memory_limit`` is not a positive size or None
    :raises TypeError: if ``initializer`` is not callable or ``initargs`` not a tuple

    The ``start()`` block starts the worker processes and stops them when it ends.
    ``run_fn`` and its arguments travel with cloudpickle, so lambdas, closures and
    functions defined in ``__main__`` work; each call sees its arguments as they were
    at ``submit``. A coroutine ``run_fn`` runs on an event loop in the worker. What a
    call logs reaches this process's loggers. A call can be cancelled until its batch
    is handed to loky.

    Each worker process runs in a loky executor of its own, so a worker that dies
    (a segfault, ``os._exit``, the out-of-memory killer) costs only the calls it held:
    the call it ran is Crashed, naming the exit code or signal; calls of its batch
    that had finished are Crashed too (their results were lost with it); calls it
    had not started run in another worker. Calls in the other workers go on, and a
    fresh worker takes the dead one's place. No call runs twice. Recycled workers
    (``max_calls_per_worker``, ``worker_memory_limit``) lose nothing: they are
    replaced between calls; a call that takes a fresh worker past
    ``worker_memory_limit`` on its own is Crashed, naming the limit. A ``run_fn``,
    argument or result that cannot be pickled Crashes that call alone.

    A call submitted with ``timeout_seconds`` that runs past it (counted from its
    start in the worker) ends its worker process, which is replaced: the call is
    Failed, named "TimedOut", about as soon as the limit passes; the calls of its
    batch that had finished keep their States, those it had not started run in
    another worker, and calls in the other workers go on. The process is killed, so
    the call's ``finally`` blocks and context managers do not run.
    """

    max_workers: Setting[Optional[int]] = Setting("The number of worker processes; None for one per CPU.")
    initializer: Setting[Optional[Callable[..., Any]]] = Setting(
        "Called as ``initializer(*initargs)`` in each worker process when it starts."
    )
    initargs: Setting[Tuple[Any, ...]] = Setting("The arguments of :attr:`initializer`.")
    env: Setting[Optional[Dict[str, str]]] = Setting("Environment variables set in the worker processes.")
    batch_size: Setting[BatchSize] = Setting(BATCH_SIZE_DOC)
    large_value_bytes: Setting[Optional[int]] = Setting(LARGE_VALUE_BYTES_DOC)
    max_calls_per_worker: Setting[Optional[int]] = Setting(
        "Calls a worker process runs before it is replaced; None keeps it."
    )
    worker_memory_limit: Setting[Optional[int]] = Setting(
        "Resident memory (bytes) above which a worker process is replaced after a call; None for no limit."
    )

    _handles = ("_pool", "_shared")
    _snapshots_arguments = True

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
        check_max_workers(max_workers)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"`initializer` must be callable or None, got {initializer!r}.")
        if not isinstance(initargs, tuple):
            raise TypeError(
                f"`initargs` must be a tuple, got {type(initargs).__name__}: {initargs!r}."
            )
        if env is not None and (
            not isinstance(env, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ValueError(
                f"`env` must be a mapping of environment variable names to string values, "
                f"got {env!r}."
            )
        self.max_workers = max_workers
        self.initializer = initializer
        self.initargs = initargs
        self.env = dict(env) if env is not None else None
        self.batch_size = check_batch_size(batch_size)
        self.large_value_bytes = check_large_value_bytes(large_value_bytes)
        self.max_calls_per_worker = check_max_calls_per_worker(max_calls_per_worker)
        self.worker_memory_limit = check_worker_memory_limit(worker_memory_limit)
        self._pool: Optional[ProcessPool] = None
        super().__init__()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.PARALLEL

    def _open(self) -> None:
        if self.large_value_bytes is not None:
            self._shared = SharedFiles(self.large_value_bytes)
        self._pool = ProcessPool(
            self.logger,
            self.max_workers or loky.cpu_count(),
            self.initializer,
            self.initargs,
            self.env,
            self.batch_size,
            self.max_calls_per_worker,
            self.worker_memory_limit,
        )

    def _close(self) -> None:
        pool, self._pool = self._pool, None
        try:
            if pool is not None:
                pool.shutdown()
        finally:
            self._close_shared()

    def _abort(self, exc: BaseException) -> None:
        self._cancel_pending()
        pool, self._pool = self._pool, None
        try:
            if pool is not None:
                pool.terminate(exc)
        finally:
            self._close_shared()

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> CallHandle:
        return self._started_pool().submit(task_run, run_fn, run_kwargs)

    def _dispatch_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
    ) -> List[CallHandle]:
        return list(self._started_pool().submit_many(task_runs, run_fn, run_kwargs_list))

    def _started_pool(self) -> ProcessPool:
        pool = self._pool
        if pool is None:
            raise self._not_started()
        return pool
