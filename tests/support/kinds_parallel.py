"""The parallel runner: loky worker processes."""

from taskrunners import TaskConcurrencyType
from tests.support.kinds import RunnerKind

KINDS = [
    RunnerKind(
        "parallel",
        "ParallelTaskRunner",
        TaskConcurrencyType.PARALLEL,
        kwargs=lambda request: {"max_workers": 2},
        in_process=False,
        pickles_results=True,
    ),
]
