"""The parallel runner: loky worker processes.

Two kinds: ``parallel``, the default (``batch_size="auto"``: calls are gathered into
batches while the workers are busy), in every mode; and ``parallel-batch1``
(``batch_size=1``: one loky task per call), on the blocking twin only. The facade
adds no scheduling of its own, so the twin is where the two settings differ; the
other modes of the second kind are deselected at collection, which keeps its cost
to a third of the first's.
"""

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
    RunnerKind(
        "parallel-batch1",
        "ParallelTaskRunner",
        TaskConcurrencyType.PARALLEL,
        kwargs=lambda request: {"max_workers": 2, "batch_size": 1},
        in_process=False,
        pickles_results=True,
        twin_only=True,
    ),
]

