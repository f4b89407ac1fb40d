"""The blocking twins: the same runners, for plain synchronous code.

``with runner.start():``, ``runner.submit(task_run, run_fn, run_kwargs)`` and
``runner.wait(future, timeout=None)`` block the calling thread; no event loop is
needed. Futures they return have ``asynchronous=False``.

>>> from taskrunners.sync import ConcurrentTaskRunner
>>> from taskrunners import TaskRun
>>> from taskrunners.states import Completed
>>> with ConcurrentTaskRunner().start() as runner:
...     future = runner.submit(TaskRun(), lambda: Completed(data="hi"), {})
...     future.result()
'hi'

What a worker process that dies mid-call (a segfault, the out-of-memory killer,
``os._exit()``) costs on each runner; no runner but Dask runs a call twice:

========  ====================  =====================  ===============================
runner    the call it ran       calls in other         its batch's finished / unstarted
                                workers                calls
========  ====================  =====================  ===============================
Parallel  Crashed               go on                  Crashed (result lost) / run again
Dask      run again, then       go on                  the whole batch runs again
          Crashed
Ray       Crashed               go on                  Crashed (result lost) / run again
========  ====================  =====================  ===============================

Sequential and Concurrent run calls in this process: a segfault there ends it.
"""

from taskrunners._core.seam import (
    BlockingTaskRunner,
    ConcurrentTaskRunner,
    DaskTaskRunner,
    ParallelTaskRunner,
    RayTaskRunner,
    SequentialTaskRunner,
    TaskConcurrencyType,
    ray_options,
)

__all__ = [
    "BlockingTaskRunner",
    "TaskConcurrencyType",
    "SequentialTaskRunner",
    "ConcurrentTaskRunner",
    "ParallelTaskRunner",
    "DaskTaskRunner",
    "RayTaskRunner",
    "ray_options",
]
