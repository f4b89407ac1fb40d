"""The blocking RayTaskRunner (not implemented yet)."""

from __future__ import annotations

from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType

__all__ = ["RayTaskRunner"]


class RayTaskRunner(BlockingTaskRunner):
    """Not implemented yet."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError("RayTaskRunner is not implemented yet.")

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        return TaskConcurrencyType.PARALLEL

    def _dispatch(self, task_run, run_fn, run_kwargs):
        raise NotImplementedError
