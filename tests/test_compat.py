"""RunnerExecutor: a concurrent.futures.Executor over any runner."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

import taskrunners
import taskrunners.sync
from taskrunners.compat.futures import RunnerExecutor
from tests.conftest import ALL_KINDS, kind_params
from tests.payloads import async_double, divide, nap

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["twin", "facade"])
def executor(kind, request):
    runner = kind.make(request, blocking=request.param == "twin")
    executor = RunnerExecutor(runner)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def test_submit_gives_values_and_exceptions(executor):
    ok = executor.submit(divide, 1, b=4)
    bad = executor.submit(divide, 1, 0)
    assert isinstance(ok, concurrent.futures.Future)
    assert ok.result(timeout=60) == 0.25
    assert isinstance(bad.exception(timeout=60), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        bad.result()


def test_coroutine_functions_and_map(executor):
    assert executor.submit(async_double, 21).result(timeout=60) == 42
    assert list(executor.map(divide, [1, 2, 3], [1, 2, 4], timeout=60)) == [1.0, 1.0, 0.75]


def test_context_manager_starts_and_stops_the_runner(kind, request):
    runner = kind.make(request, blocking=True)
    with RunnerExecutor(runner) as executor:
        assert executor.submit(divide, 6, 3).result(timeout=60) == 2
        assert runner._started
    assert not runner._started
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(divide, 1, 1)


def test_shutdown_waits_for_submitted_calls(kind, request):
    executor = RunnerExecutor(kind.make(request, blocking=True))
    futures = [executor.submit(nap, 0.2) for _ in range(3)]
    executor.shutdown(wait=True)
    assert all(future.done() for future in futures)
    assert [future.result() for future in futures] == [0.2, 0.2, 0.2]


@pytest.mark.parametrize(
    "kind",
    kind_params([k for k in ALL_KINDS if k.concurrency_type is not taskrunners.TaskConcurrencyType.SEQUENTIAL]),
    indirect=True,
)
def test_shutdown_can_cancel_calls_not_started(kind, request):
    if kind.class_name == "ConcurrentTaskRunner" and not kind.kwargs(request):
        runner = taskrunners.sync.ConcurrentTaskRunner(max_workers=1)
    else:
        runner = kind.make(request, blocking=True)
    executor = RunnerExecutor(runner)
    first = executor.submit(nap, 1.0)
    queued = [executor.submit(nap, 1.0) for _ in range(20)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert first.done()
    assert any(future.cancelled() for future in queued)


def test_refuses_what_is_not_a_runner():
    with pytest.raises(TypeError, match="needs a taskrunners runner"):
        RunnerExecutor(concurrent.futures.ThreadPoolExecutor())


def test_works_with_run_in_executor():
    async def main():
        with RunnerExecutor(taskrunners.ConcurrentTaskRunner()) as executor:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(executor, divide, 9, 3)

    assert asyncio.run(main()) == 3
