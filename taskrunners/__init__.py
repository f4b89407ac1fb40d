"""taskrunners: run function calls on pluggable backends behind one small API.

The same runners work from plain synchronous code (:mod:`taskrunners.sync`) and from
async code on asyncio or trio (this module), in order, on threads and the event
loop, on local worker processes, on a Dask cluster or on a Ray cluster.
"""

from taskrunners import task_runners
from taskrunners.flows import flow
from taskrunners.futures import PrefectFuture, TaskRun, as_completed, wait
from taskrunners.sync import ray_options
from taskrunners.tasks import task, unmapped
from taskrunners.task_runners import *  # noqa: F403 - the runner classes, listed there

__all__ = ["ray_options", "PrefectFuture", "TaskRun", "flow", "task", "unmapped", "wait", "as_completed"]
__all__ += task_runners.__all__
