"""RunnerExecutor: a concurrent.futures.Executor over any runner."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import pathlib
import shutil
import tempfile

import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskConcurrencyType
from taskrunners.compat.futures import RunnerExecutor
from tests.support.kinds import all_kinds, parametrize_kinds
from tests.support.payloads import async_double, divide, first_item, mark_then_nap, nap
from tests.support.processes import run_python
from tests.support.waiting import wait_for_path

pytestmark = pytest.mark.timeout(300)


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
    error = bad.exception(timeout=60)
    assert type(error) is ZeroDivisionError and error.args == ("division by zero",)
    with pytest.raises(ZeroDivisionError):
        bad.result()


def test_coroutine_functions_and_map(executor):
    assert executor.submit(async_double, 21).result(timeout=60) == 42
    assert list(executor.map(divide, [1, 2, 3], [1, 2, 4], timeout=60)) == [1.0, 1.0, 0.75]


@parametrize_kinds(k for k in all_kinds() if k.class_name != "ConcurrentTaskRunner")
def test_a_call_sees_its_arguments_as_they_were_at_submit(executor, kind):
    if kind.concurrency_type is not TaskConcurrencyType.SEQUENTIAL:
        for _ in range(4):
            executor.submit(nap, 0.5)
    values = [0]
    futures = []
    for i in range(12):
        values[0] = i
        futures.append(executor.submit(first_item, values))
    values[0] = 99
    assert [future.result(timeout=60) for future in futures] == list(range(12))


def test_context_manager_starts_and_stops_the_runner(kind, request):
    runner = kind.make(request, blocking=True)
    with RunnerExecutor(runner) as executor:
        assert executor.submit(divide, 6, 3).result(timeout=60) == 2
        assert runner.is_started
    assert not runner.is_started
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(divide, 1, 1)


def test_shutdown_waits_for_submitted_calls(kind, request):
    executor = RunnerExecutor(kind.make(request, blocking=True))
    futures = [executor.submit(nap, 0.2) for _ in range(3)]
    executor.shutdown(wait=True)
    assert all(future.done() for future in futures)
    assert [future.result() for future in futures] == [0.2, 0.2, 0.2]


NOT_SEQUENTIAL = parametrize_kinds(
    k for k in all_kinds() if k.concurrency_type is not TaskConcurrencyType.SEQUENTIAL
)


def one_at_a_time(kind, request):
    """A blocking runner of ``kind`` whose calls queue behind a running one."""
    if kind.class_name == "ConcurrentTaskRunner" and not kind.kwargs(request):
        return taskrunners.sync.ConcurrentTaskRunner(max_workers=1)
    return kind.make(request, blocking=True)


def test_a_running_call_cannot_be_cancelled_and_runs_to_completion(executor, kind, tmp_path):
    marker = tmp_path / "started"
    future = executor.submit(mark_then_nap, str(marker), 1.0)
    if kind.concurrency_type is TaskConcurrencyType.SEQUENTIAL:
        assert future.done()  # a Sequential call runs inside submit
    else:
        wait_for_path(marker, patience=120)
        assert future.running()
    assert not future.cancel()
    assert not future.cancelled()
    assert future.result(timeout=60) == str(marker)
    assert not future.running() and future.done()


@NOT_SEQUENTIAL
def test_shutdown_cancels_exactly_the_calls_not_started(kind, request, tmp_path):
    executor = RunnerExecutor(one_at_a_time(kind, request))
    markers = [tmp_path / f"call-{n}" for n in range(12)]
    futures = [executor.submit(mark_then_nap, str(marker), 0.5) for marker in markers]
    wait_for_path(markers[0], patience=120)
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(future.done() for future in futures)
    cancelled = [future.cancelled() for future in futures]
    # How many calls had started when shutdown() came is a race (a runner may hand
    # several to its workers at once); each call is checked against what it did below.
    assert any(cancelled) and not cancelled[0]
    for future, marker, was_cancelled in zip(futures, markers, cancelled):
        if was_cancelled:
            assert not marker.exists(), f"{marker.name} was cancelled but ran"
        else:
            assert future.result() == str(marker) and marker.exists()


def test_refuses_what_is_not_a_runner():
    with pytest.raises(TypeError, match="needs a taskrunners runner"):
        RunnerExecutor(concurrent.futures.ThreadPoolExecutor())


def test_works_with_run_in_executor():
    async def main():
        with RunnerExecutor(taskrunners.ConcurrentTaskRunner()) as executor:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(executor, divide, 9, 3)

    assert asyncio.run(main()) == 3


EXIT_RUNNERS = [
    pytest.param("SequentialTaskRunner", {}, id="sequential"),
    pytest.param("ConcurrentTaskRunner", {"max_workers": 1}, id="concurrent"),
    pytest.param("ParallelTaskRunner", {"max_workers": 1}, id="parallel"),
    pytest.param(
        "DaskTaskRunner",
        {"cluster_kwargs": {"n_workers": 1, "threads_per_worker": 1, "processes": True}},
        id="dask",
        marks=pytest.mark.dask,
    ),
    pytest.param(
        "RayTaskRunner",
        {"init_kwargs": {"num_cpus": 1, "include_dashboard": False}},
        id="ray",
        marks=pytest.mark.ray,
    ),
]


@pytest.mark.parametrize("variant", ["no-shutdown", "shutdown-nowait", "atexit-submit"])
@pytest.mark.parametrize("runner_class, kwargs", EXIT_RUNNERS)
def test_pending_calls_finish_at_interpreter_exit_quietly(runner_class, kwargs, variant, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    # Short: Ray's socket paths under it are limited to 107 bytes.
    temp = pathlib.Path(tempfile.mkdtemp(prefix="tx"))
    env = dict(os.environ, TMPDIR=str(temp))
    done = run_python(
        "-m", "tests.support.executor_exit_script", runner_class, json.dumps(kwargs), variant, calls,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in calls.iterdir()) == ["call-0", "call-1", "call-2"]
    for word in ("Traceback", "Error", "Exception"):
        assert word not in done.stderr, done.stderr
    if variant == "atexit-submit":
        assert "refused: cannot schedule new futures after interpreter shutdown" in done.stdout
    try:
        assert leftovers(temp) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def leftovers(temp):
    """What a run left in its temporary folder, but for what the engines keep on purpose:
    Ray's session logs, and the lock files of Dask's shared scratch space."""
    left = []
    for path in sorted(temp.rglob("*")):
        top, *rest = path.relative_to(temp).parts
        kept_by_dask = top == "dask-scratch-space" and (not rest or path.suffix == ".lock")
        if top != "ray" and not kept_by_dask:
            left.append(str(path.relative_to(temp)))
    return left
