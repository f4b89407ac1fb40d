"""The parallel runner: loky worker processes.

Two kinds: ``parallel``, the default (``batch_size="auto"``: calls are gathered into
batches while the workers are busy), in every mode; and ``parallel-batch1``
(``batch_size=1``: one loky task per call), on the blocking twin only. The facade
adds no scheduling of its own, so the twin is where the two settings differ; the
other modes of the second kind are deselected at collection, which keeps its cost
to a third of the first's.
"""

from typing import List

import pytest

from taskrunners import TaskConcurrencyType
from tests.support.kinds import RunnerKind

BATCH1_ID = "parallel-batch1"

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
        BATCH1_ID,
        "ParallelTaskRunner",
        TaskConcurrencyType.PARALLEL,
        kwargs=lambda request: {"max_workers": 2, "batch_size": 1},
        in_process=False,
        pickles_results=True,
    ),
]


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Run the ``parallel-batch1`` kind on the blocking twin only."""
    kept, deselected = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        kind = params.get("kind")
        on_twin = params.get("mode", "sync") == "sync" and "anyio_backend" not in params
        if getattr(kind, "id", None) == BATCH1_ID and not on_twin:
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
