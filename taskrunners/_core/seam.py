"""The blocking core as the layers above it use it: the facade, flows, compat.

Nothing outside ``taskrunners._core`` touches a core runner's private members; the
other layers go through these functions. (A future, below the core, holds its own
call; one that holds none asks its runner's ``_call_of``: see
:func:`taskrunners.futures.call_of`.) A *core* is a blocking twin
(:class:`~taskrunners._core.base.BlockingTaskRunner`); :func:`core_of` finds the one
under a facade runner.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List, Optional

from taskrunners._core.base import BlockingTaskRunner
from taskrunners._core.calls import CallHandle, state_of_done
from taskrunners.futures import PrefectFuture, TaskRun, call_of, not_a_runner

__all__ = [
    "core_of",
    "open_block",
    "close_block",
    "submit_call",
    "submit_calls",
    "bind",
    "call_of",
    "state_of",
    "pending_calls",
    "cancel_pending",
    "ensure_usable",
    "upstream_calls",
    "resolve_futures",
]


def core_of(runner: Any) -> BlockingTaskRunner:
    """The blocking twin doing the work of ``runner`` (a twin, or a facade over one)."""
    if isinstance(runner, BlockingTaskRunner):
        return runner
    core = getattr(runner, "_core", None)
    if not isinstance(core, BlockingTaskRunner):
        raise not_a_runner(runner)
    return core


def open_block(core: BlockingTaskRunner) -> None:
    """Enter the core's ``start()`` block (it may block: pools and clusters start)."""
    core._begin()


def close_block(core: BlockingTaskRunner, exc: Optional[BaseException]) -> None:
    """Leave the core's ``start()`` block: normally (wait for every call) or with ``exc``."""
    core._end(exc)


def submit_call(
    core: BlockingTaskRunner, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
) -> CallHandle:
    """Submit one call to a started core; its handle."""
    return core._submit_call(task_run, run_fn, run_kwargs)


def submit_calls(
    core: BlockingTaskRunner,
    task_runs: List[TaskRun],
    run_fn: Callable[..., Any],
    run_kwargs_list: List[Dict[str, Any]],
) -> List[CallHandle]:
    """Submit many calls of one ``run_fn`` to a started core at once; their handles."""
    return core._submit_calls(task_runs, run_fn, run_kwargs_list)


def bind(future: PrefectFuture, call: CallHandle) -> PrefectFuture:
    """Give ``future`` the handle of the call it stands for."""
    future._call = call
    return future


# call_of(future, core=None), from the futures: the handle of the call ``future``
# stands for, as ``core`` (or the future's own runner) sees it.

#: The State of a call that is done.
state_of = state_of_done


def pending_calls(core: BlockingTaskRunner) -> Collection[CallHandle]:
    """The calls of the current block that are not done yet (a live view)."""
    return core._pending


def cancel_pending(core: BlockingTaskRunner) -> None:
    """Cancel every call of the current block that has not started."""
    core._cancel_pending()


def ensure_usable(core: BlockingTaskRunner, action: str) -> None:
    """Raise the RuntimeError that says why the core cannot ``action`` now, if it cannot."""
    core._ensure_usable(action)


def upstream_calls(core: BlockingTaskRunner, run_kwargs: Dict[str, Any]) -> List[CallHandle]:
    """The handles of the futures anywhere in ``run_kwargs``."""
    return core._upstream_calls(run_kwargs)


def resolve_futures(core: BlockingTaskRunner, expr: Any) -> Any:
    """``expr`` with every future in it replaced by its final State (all are done)."""
    return core._resolve_futures(expr)
