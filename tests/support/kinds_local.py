"""The in-process runners."""

from taskrunners import TaskConcurrencyType
from tests.support.kinds import RunnerKind

KINDS = [
    RunnerKind("sequential", "SequentialTaskRunner", TaskConcurrencyType.SEQUENTIAL, in_process=True),
    RunnerKind("concurrent", "ConcurrentTaskRunner", TaskConcurrencyType.CONCURRENT, in_process=True),
    RunnerKind(
        "concurrent-2",
        "ConcurrentTaskRunner",
        TaskConcurrencyType.CONCURRENT,
        kwargs=lambda request: {"max_workers": 2},
        in_process=True,
    ),
]
