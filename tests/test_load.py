"""Load: many calls, none lost, results in order.

Full size with TASKRUNNERS_SOAK=1 (100,000 calls through the Concurrent twin and facade,
20,000 through Parallel); CI runs a tenth of that. Peak memory growth is printed
(run with -s to see it); the measured numbers belong in benchmarks, not assertions.
"""

from __future__ import annotations

import os
import resource

import anyio
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskRun
from tests.support import payloads

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]

SCALE = 1 if os.environ.get("TASKRUNNERS_SOAK") == "1" else 10


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    "runner_class, kwargs, calls",
    [
        ("ConcurrentTaskRunner", {}, 100_000),
        ("ParallelTaskRunner", {"max_workers": 2}, 20_000),
    ],
)
def test_twin_loses_no_call(runner_class, kwargs, calls):
    calls //= SCALE
    runner = getattr(taskrunners.sync, runner_class)(**kwargs)
    before = peak_rss_mib()
    with runner.start():
        futures = [runner.submit(TaskRun(), payloads.return_value, {"value": i}) for i in range(calls)]
        values = [runner.wait(future).result() for future in futures]
    assert values == list(range(calls))
    print(f"\n{runner_class} twin, {calls} calls: peak RSS grew {peak_rss_mib() - before:.1f} MiB")


@pytest.mark.parametrize("use_async_calls", [False, True])
def test_concurrent_facade_loses_no_call(use_async_calls):
    calls = 100_000 // SCALE
    run_fn = payloads.async_return_value if use_async_calls else payloads.return_value

    async def main():
        async with taskrunners.ConcurrentTaskRunner().start() as runner:
            futures = [await runner.submit(TaskRun(), run_fn, {"value": i}) for i in range(calls)]
            return [(await runner.wait(future)).result() for future in futures]

    before = peak_rss_mib()
    assert anyio.run(main) == list(range(calls))
    print(f"\nConcurrent facade, {calls} calls: peak RSS grew {peak_rss_mib() - before:.1f} MiB")
