"""ConcurrentTaskRunner specifics: bounded threads, context variables, no growth."""

from __future__ import annotations

import contextvars
import gc
import threading
import time
import weakref

import anyio
import psutil
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskRun
from taskrunners.states import Completed
from tests.support import payloads

pytestmark = pytest.mark.timeout(180)

request_id: contextvars.ContextVar = contextvars.ContextVar("request_id", default="unset")


def read_request_id():
    return Completed(data=request_id.get())


async def async_read_request_id():
    return Completed(data=request_id.get())


def count_threads_in_use(active, peak, lock, seconds):
    with lock:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
    time.sleep(seconds)
    with lock:
        active[0] -= 1
    return Completed(data=None)


@pytest.mark.parametrize("max_workers, expected_peak", [(1, 1), (3, 3), (None, 12)])
def test_max_workers_bounds_the_threads_running_plain_calls(max_workers, expected_peak):
    active, peak, lock = [0], [0], threading.Lock()
    runner = taskrunners.sync.ConcurrentTaskRunner(max_workers=max_workers)
    with runner.start():
        for _ in range(12):
            runner.submit(
                TaskRun(), count_threads_in_use, {"active": active, "peak": peak, "lock": lock, "seconds": 0.3}
            )
    assert peak[0] == expected_peak


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_max_workers_is_validated(bad):
    with pytest.raises(ValueError, match="`max_workers` must be a positive integer or None"):
        taskrunners.ConcurrentTaskRunner(max_workers=bad)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_chain_of_fifty_dependent_calls_finishes_on_one_worker(blocking):
    runner = (taskrunners.sync if blocking else taskrunners).ConcurrentTaskRunner(max_workers=1)

    def chain(submit):
        future = submit(payloads.return_value, {"value": 0})
        for _ in range(50):
            future = submit(payloads.add_upstream, {"upstream": future, "y": 1})
        return future

    if blocking:
        with runner.start():
            assert runner.wait(chain(lambda fn, kw: runner.submit(TaskRun(), fn, kw))).result() == 50
        return

    async def main():
        async with runner.start():
            futures = []

            async def submit_all():
                future = await runner.submit(TaskRun(), payloads.return_value, {"value": 0})
                for _ in range(50):
                    future = await runner.submit(TaskRun(), payloads.add_upstream, {"upstream": future, "y": 1})
                futures.append(future)

            await submit_all()
            return (await runner.wait(futures[0])).result()

    assert anyio.run(main) == 50


def test_calls_see_the_submitting_context_at_submit_time():
    runner = taskrunners.sync.ConcurrentTaskRunner()
    with runner.start():
        token = request_id.set("first")
        plain = runner.submit(TaskRun(), read_request_id, {})
        coroutine = runner.submit(TaskRun(), async_read_request_id, {})
        request_id.reset(token)
        after = runner.submit(TaskRun(), read_request_id, {})
        values = [runner.wait(f).result() for f in (plain, coroutine, after)]
    assert values == ["first", "first", "unset"]


async def test_facade_calls_see_the_caller_context(anyio_backend):
    runner = taskrunners.ConcurrentTaskRunner()
    async with runner.start():
        request_id.set("facade")
        futures = [
            await runner.submit(TaskRun(), read_request_id, {}),
            await runner.submit(TaskRun(), async_read_request_id, {}),
        ]
        assert [(await runner.wait(f)).result() for f in futures] == ["facade", "facade"]


async def test_ten_thousand_pending_waits_hold_no_thread_each(anyio_backend):
    runner = taskrunners.ConcurrentTaskRunner()
    release = anyio.Event()

    async def held():
        await release.wait()
        return Completed(data=1)

    states = []

    async def wait_for(future):
        states.append(await runner.wait(future))

    async with runner.start():
        futures = [await runner.submit(TaskRun(), held, {}) for _ in range(10_000)]
        threads_before = threading.active_count()
        async with anyio.create_task_group() as waiters:
            for future in futures:
                waiters.start_soon(wait_for, future)
            await anyio.sleep(0.2)
            assert threading.active_count() <= threads_before + 5
            release.set()
    assert len(states) == 10_000 and all(state.result() == 1 for state in states)


async def test_many_async_calls_interleave_on_the_loop_without_threads(anyio_backend):
    runner = taskrunners.ConcurrentTaskRunner()
    async with runner.start():
        threads_before = threading.active_count()
        futures = [
            await runner.submit(TaskRun(), payloads.async_sleep_then_return, {"seconds": 0.5, "value": i})
            for i in range(2000)
        ]
        assert threading.active_count() <= threads_before + 5
        values = [(await runner.wait(f)).result() for f in futures]
    assert values == list(range(2000))


def test_the_twin_runs_coroutines_from_a_thread_that_runs_an_event_loop():
    runner = taskrunners.sync.ConcurrentTaskRunner()

    async def notebook_cell():
        # A blocking call from inside a running loop, as a notebook does.
        with runner.start():
            return runner.wait(runner.submit(TaskRun(), payloads.async_return_value, {"value": 3})).result()

    assert anyio.run(notebook_cell) == 3


def return_box():
    """A fresh Box, weakly referenced to see whether the runner still holds the call's State."""
    return Completed(data=payloads.Box())


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def assert_boxes_gone(boxes):
    gc.collect()
    assert [ref for ref in boxes if ref() is not None] == []


@pytest.mark.parametrize("blocking", [True, False])
def test_finished_calls_are_not_kept_once_their_futures_are_gone(blocking):
    runner = (taskrunners.sync if blocking else taskrunners).ConcurrentTaskRunner()
    boxes = []
    memory = {}

    def loop_sync():
        with runner.start():
            for i in range(100_000):
                state = runner.wait(runner.submit(TaskRun(), return_box, {}))
                if i % 1000 == 0:
                    boxes.append(weakref.ref(state.data))
                if i == 20_000:
                    memory["warm"] = rss()
            memory["end"] = rss()
            assert_boxes_gone(boxes)  # while the block is open, too

    async def loop_async():
        async with runner.start():
            for i in range(100_000):
                future = await runner.submit(TaskRun(), return_box, {})
                state = await runner.wait(future)
                if i % 1000 == 0:
                    boxes.append(weakref.ref(state.data))
                if i == 20_000:
                    memory["warm"] = rss()
            del future, state
            memory["end"] = rss()
            assert_boxes_gone(boxes)  # while the block is open, too

    loop_sync() if blocking else anyio.run(loop_async)
    assert_boxes_gone(boxes)
    # Keeping 80,000 finished calls would cost tens of MB; a flat loop costs ~nothing.
    assert memory["end"] - memory["warm"] < 16 * 2**20
