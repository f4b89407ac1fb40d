"""The one door into the blocking core, for the layers above it: facade, flows, compat.

No module outside ``taskrunners._core`` imports any other core module
(``tests/test_layout.py`` checks it). The seam re-exports what those layers use of
the core, the blocking twins among it, and holds the driving they share:

- submitting calls to a core and binding each future to its call
  (:func:`submit`, :func:`submit_many`);
- waiting for a future's call from async code (:func:`state_when_done`), for every
  call of a block (:func:`drain`), or for the futures inside a value and resolving
  them to their States (:func:`states_when_done`, :func:`astates_when_done`);
- admitting a coroutine call that the facade runs on its own event loop, and
  resolving its arguments once their calls are done (:func:`admit_coroutine_call`,
  :func:`resolved`).

A *core* is a blocking twin (:class:`BlockingTaskRunner`); :func:`core_of` finds the
one under a facade runner.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List, Optional

from taskrunners._collections import iter_leaves
from taskrunners._core.arguments import FLAT_TYPES, check_submission, is_future
from taskrunners._core.base import BlockingTaskRunner, RunnerIdentity, TaskConcurrencyType
from taskrunners._core.batching import BatchSize
from taskrunners._core.remote.sharing import DEFAULT_LARGE_VALUE_BYTES
from taskrunners._core.calls import Call, CallHandle, Relay, block_until_done, state_of_done
from taskrunners._core.dask.runner import DaskTaskRunner
from taskrunners._core.futures import (
    Async,
    PrefectFuture,
    RunFn,
    Sync,
    TaskRun,
    call_of,
    not_a_runner,
    numbered_runs,
    wait_for_state_async,
)
from taskrunners._core.limits import (
    CallTimedOut,
    check_timeout,
    is_timed_out,
    split_limit,
    timed_out_state,
    with_limit,
)
from taskrunners._core.local.limited import time_limit
from taskrunners._core.local.interrupts import interrupted_since, sigint_watch
from taskrunners._core.local.sequential import SequentialTaskRunner
from taskrunners._core.local.threads import ConcurrentTaskRunner
from taskrunners._core.parallel.runner import ParallelTaskRunner
from taskrunners._core.ray.options import ray_options
from taskrunners._core.ray.runner import RayTaskRunner
from taskrunners._core.remote.protocol import Upstream
from taskrunners._core.remote.snapshots import Memo, all_unchanging, snapshot_each, unchanging
from taskrunners._core.running import checked_state, is_coroutine_function
from taskrunners._core.waiting import in_event_loop, wait_until_done
from taskrunners.states import State

__all__ = [
    # The runners: the blocking twins and what the facade shares with them.
    "BlockingTaskRunner",
    "SequentialTaskRunner",
    "ConcurrentTaskRunner",
    "ParallelTaskRunner",
    "DaskTaskRunner",
    "RayTaskRunner",
    "RunnerIdentity",
    "TaskConcurrencyType",
    "BatchSize",
    "DEFAULT_LARGE_VALUE_BYTES",
    "ray_options",
    # Task runs, futures and calls.
    "TaskRun",
    "PrefectFuture",
    "Sync",
    "Async",
    "RunFn",
    "Call",
    "Relay",
    "CallHandle",
    "call_of",
    "numbered_runs",
    "state_of_done",
    "is_future",
    # Submissions: checking them, running a coroutine call to a State, snapshots.
    "check_submission",
    "checked_state",
    "is_coroutine_function",
    "sigint_watch",
    "interrupted_since",
    "FLAT_TYPES",
    "Upstream",
    "Memo",
    "all_unchanging",
    "snapshot_each",
    "unchanging",
    # Time limits.
    "check_timeout",
    "with_limit",
    "split_limit",
    "timed_out_state",
    "is_timed_out",
    "CallTimedOut",
    "time_limit",
    "stop_running",
    # Waiting from async code.
    "in_event_loop",
    "wait_until_done",
    # The driving the layers share.
    "core_of",
    "submit",
    "submit_many",
    "map_memo",
    "future_for",
    "track",
    "cancel_pending",
    "drain",
    "state_when_done",
    "states_when_done",
    "astates_when_done",
    "admit_coroutine_call",
    "resolved",
]


def core_of(runner: Any) -> BlockingTaskRunner:
    """The blocking twin doing the work of ``runner`` (a twin, or a facade over one).

    :raises TypeError: if ``runner`` is not a taskrunners runner
    """
    if isinstance(runner, BlockingTaskRunner):
        return runner
    core = getattr(runner, "_core", None)
    if not isinstance(core, BlockingTaskRunner):
        raise not_a_runner(runner)
    return core


# -- submitting ------------------------------------------------------------------------


def future_for(
    call: CallHandle, task_run: TaskRun, runner: Any, asynchronous: bool
) -> PrefectFuture[Any]:
    """A future of ``runner`` for ``task_run`` that holds the handle of its call."""
    future: PrefectFuture[Any] = PrefectFuture(task_run, runner, asynchronous)
    future._call = call
    return future


def submit(
    core: BlockingTaskRunner,
    task_run: TaskRun,
    run_fn: Callable[..., Any],
    run_kwargs: Dict[str, Any],
    runner: Any = None,
    asynchronous: bool = False,
) -> PrefectFuture[Any]:
    """Submit one call (its arguments checked by the caller) to a started core.

    :param runner: the runner the future belongs to: the core, or the facade over it
    :param asynchronous: whether the future's ``wait()`` and ``result()`` are awaited
    :raises RuntimeError: if the core is not started, or was unpickled
    """
    call = core._submit_call(task_run, run_fn, run_kwargs)
    return future_for(call, task_run, core if runner is None else runner, asynchronous)


def submit_many(
    core: BlockingTaskRunner,
    task_runs: List[TaskRun],
    run_fn: Callable[..., Any],
    run_kwargs_list: List[Dict[str, Any]],
    runner: Any = None,
    asynchronous: bool = False,
    memo: Optional[Memo] = None,
) -> List[PrefectFuture[Any]]:
    """Submit many calls of one ``run_fn`` to a started core at once; their futures.

    :param memo: from :func:`map_memo`, shared by the parts of one map submitted one
        after the other: a value they share is taken (and sent) once for all of them
    """
    calls = core._submit_calls(task_runs, run_fn, run_kwargs_list, memo)
    owner = core if runner is None else runner
    return [future_for(call, run, owner, asynchronous) for call, run in zip(calls, task_runs)]


def map_memo(core: BlockingTaskRunner) -> Memo:
    """A memo for the parts of one map submitted to a started ``core`` (see :func:`submit_many`)."""
    return Memo(core._shared)


def track(core: BlockingTaskRunner, call: CallHandle) -> None:
    """Count ``call`` among the core's calls: leaving its block waits for it."""
    core._track(call)


def stop_running(core: BlockingTaskRunner, state: State) -> None:
    """End every call of the core's block now: those not started cancelled, the others
    given ``state`` (their work is stopped when the block is left with an exception)."""
    core._cancel_pending()
    for call in list(core._pending):
        if isinstance(call, Call):
            call.set_result(state)


def cancel_pending(core: BlockingTaskRunner) -> None:
    """Cancel every call of the core's current block that has not started."""
    core._cancel_pending()


# -- waiting ------------------------------------------------------------------------


async def drain(core: BlockingTaskRunner) -> None:
    """Wait, holding no thread, until every call of the core's current block is done."""
    pending: Collection[CallHandle] = core._pending
    while True:
        calls = list(pending)  # taken at once: other threads remove calls meanwhile
        if not calls:
            return
        await wait_until_done(calls[0], None)


async def state_when_done(
    future: PrefectFuture[Any], timeout: Optional[float], core: Optional[BlockingTaskRunner] = None
) -> Optional[State[Any]]:
    """The final State of ``future``'s call, or None after ``timeout``; holds no thread.

    :param core: the core the call is reached through (default: the future's runner)
    :raises RuntimeError: if the runner cannot reach the call (it was unpickled)
    """
    return await wait_for_state_async(call_of(future, core), timeout)


def states_when_done(value: Any, core: Optional[BlockingTaskRunner] = None) -> Any:
    """``value`` once every future in it is done (this blocks), each replaced by its State.

    :param core: the core the calls are reached through (default: the runner of the
        first future found)
    """
    futures = list(iter_leaves(value, is_future))
    if not futures:
        return value
    block_until_done([call_of(future) for future in futures])
    return _resolve_futures(value, futures, core)


async def astates_when_done(value: Any, core: Optional[BlockingTaskRunner] = None) -> Any:
    """:func:`states_when_done` from async code: waits holding no thread."""
    futures = list(iter_leaves(value, is_future))
    if not futures:
        return value
    for future in futures:
        await wait_until_done(call_of(future), None)
    return _resolve_futures(value, futures, core)


def _resolve_futures(
    value: Any, futures: List[PrefectFuture[Any]], core: Optional[BlockingTaskRunner]
) -> Any:
    if core is None:
        core = core_of(futures[0].task_runner)
    return core._resolve_futures(value)


# -- coroutine calls run by the facade ------------------------------------------------


def admit_coroutine_call(core: BlockingTaskRunner, run_kwargs: Dict[str, Any]) -> List[CallHandle]:
    """Admit a coroutine call that the facade runs on its caller's event loop.

    :return: the calls it must wait for: those of the futures in ``run_kwargs``
    :raises RuntimeError: saying why the core cannot take work now, if it cannot
    """
    core._ensure_usable("submit work")
    return core._upstream_calls(run_kwargs)


async def resolved(
    core: BlockingTaskRunner, run_kwargs: Dict[str, Any], upstream: List[CallHandle]
) -> Dict[str, Any]:
    """``run_kwargs`` once the ``upstream`` calls are done, each future in it replaced by
    its State; waits holding no thread."""
    if not upstream:
        return run_kwargs
    for call in upstream:
        await wait_until_done(call, None)
    return core._resolve_futures(run_kwargs)
