"""SequentialTaskRunner specifics: calls run inside submit, one at a time."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskRun
from taskrunners.states import Completed
from tests.support import payloads

pytestmark = pytest.mark.timeout(60)


def test_calls_from_several_threads_run_one_at_a_time():
    active, overlaps, lock = [0], [], threading.Lock()

    def exclusive():
        with lock:
            active[0] += 1
            overlaps.append(active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return Completed(data=None)

    runner = taskrunners.sync.SequentialTaskRunner()
    with runner.start():
        threads = [
            threading.Thread(target=lambda: [runner.submit(TaskRun(), exclusive, {}) for _ in range(10)])
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(overlaps) == 40 and max(overlaps) == 1


def test_the_call_has_finished_when_submit_returns():
    runner = taskrunners.sync.SequentialTaskRunner()
    with runner.start():
        future = runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 0.1, "value": 1})
        assert taskrunners.wait([future], timeout=0).done == {future}


async def test_async_calls_run_inside_submit_on_the_callers_loop(anyio_backend):
    order = []

    async def record(label):
        order.append(label)
        return Completed(data=label)

    async with taskrunners.SequentialTaskRunner().start() as runner:
        await runner.submit(TaskRun(), record, {"label": "a"})
        order.append("between")
        await runner.submit(TaskRun(), record, {"label": "b"})
    assert order == ["a", "between", "b"]


def test_the_twin_runs_coroutines_from_a_thread_that_runs_an_event_loop():
    async def notebook_cell():
        with taskrunners.sync.SequentialTaskRunner().start() as runner:
            return runner.wait(runner.submit(TaskRun(), payloads.async_return_value, {"value": 2})).result()

    assert anyio.run(notebook_cell) == 2
