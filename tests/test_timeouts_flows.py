"""Timeouts through the layers above the runners: tasks and their retries, flows, the
executor; and what the in-process runners (Sequential, Concurrent) add."""

from __future__ import annotations

import os
import pathlib
import socket
import sys
import threading
import time

import anyio
import cloudpickle
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskRun, flow, task
from taskrunners.compat.futures import RunnerExecutor
from tests.support import stuck
from tests.support.driver import driving
from tests.support.kinds import all_kinds, kind_params
from tests.support.processes import run_python
from tests.test_flows import ASYNC_CASES, RUNNERS, Runner

pytestmark = pytest.mark.timeout(240)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LIMIT = 1.0
SLACK = 10.0  # from the limit to the State: about a second, with room for a loaded machine


@pytest.fixture(params=[pytest.param(r, id=r.id, marks=r.shared.marks) for r in RUNNERS])
def runner(request: pytest.FixtureRequest) -> Runner:
    return Runner(request.param, request)


def _attempt(directory: str) -> int:
    number = len(os.listdir(directory)) + 1
    (pathlib.Path(directory) / f"attempt-{number}").touch()
    return number


# -- tasks -------------------------------------------------------------------------------


def test_a_task_past_its_limit_is_timed_out_and_its_flow_fails(runner, tmp_path):
    @task(timeout_seconds=LIMIT)
    def spin(counter):
        return stuck.busy(counter).result()

    @task(timeout_seconds=30)
    def fine():
        return "fine"

    @flow(task_runner=runner.make())
    def test_flow():
        return spin(str(tmp_path / "counter")), fine()

    begun = time.monotonic()
    state = test_flow()
    assert time.monotonic() - begun < LIMIT + SLACK
    assert state.is_failed()
    spun, done = state.result(raise_on_failure=False)
    assert spun.name == "TimedOut" and "spin-0" in spun.message
    with pytest.raises(TimeoutError):
        spun.result()
    assert done.result() == "fine"


def test_a_timed_out_try_is_retried_with_a_fresh_limit(runner, tmp_path):
    # Two tries stuck, then one of 0.7 s: within its own limit, not within what is
    # left of one limit for all tries.
    @task(retries=2, retry_delay_seconds=0.05, timeout_seconds=LIMIT)
    def flaky(directory):
        number = _attempt(directory)
        if number < 3:
            while True:
                pass
        time.sleep(0.7)
        return number

    @flow(task_runner=runner.make())
    def test_flow():
        return flaky(str(tmp_path))

    assert test_flow().result().result() == 3
    assert sorted(os.listdir(tmp_path)) == ["attempt-1", "attempt-2", "attempt-3"]


def test_a_run_that_times_out_on_every_try_ends_timed_out(runner, tmp_path):
    @task(retries=1, timeout_seconds=LIMIT)
    def hopeless(directory):
        _attempt(directory)
        time.sleep(30)

    @flow(task_runner=runner.make())
    def test_flow():
        return hopeless(str(tmp_path))

    state = test_flow().result(raise_on_failure=False)
    assert state.name == "TimedOut"
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("runner, backend", ASYNC_CASES, indirect=["runner"])
def test_an_async_task_past_its_limit_is_timed_out(runner, backend, tmp_path):
    @task(timeout_seconds=LIMIT)
    async def nap(counter):
        return (await stuck.asleep(counter)).result()

    @flow(task_runner=runner.make())
    async def test_flow():
        return await nap(str(tmp_path / "counter"))

    state = anyio.run(test_flow, backend=backend).result(raise_on_failure=False)
    assert state.name == "TimedOut"


def test_map_gives_each_item_its_own_limit(runner, tmp_path):
    @task(timeout_seconds=LIMIT)
    def maybe_stuck(n, directory):
        pathlib.Path(directory, str(n)).touch()
        if n == 2:
            while True:
                pass
        return n

    @flow(task_runner=runner.make())
    def test_flow():
        return maybe_stuck.map(range(5), taskrunners.unmapped(str(tmp_path)))

    states = test_flow().result(raise_on_failure=False)
    assert [s.result() for i, s in enumerate(states) if i != 2] == [0, 1, 3, 4]
    assert states[2].name == "TimedOut"
    assert sorted(os.listdir(tmp_path)) == ["0", "1", "2", "3", "4"]


# -- flows -------------------------------------------------------------------------------


def test_a_flow_past_its_limit_stops_and_is_timed_out(runner, tmp_path):
    @task
    def spin(counter):
        return stuck.busy(counter, seconds=60).result()

    @flow(task_runner=runner.make(), timeout_seconds=1.5)
    def test_flow():
        return spin(str(tmp_path / "counter")).result()

    begun = time.monotonic()
    state = test_flow()
    assert time.monotonic() - begun < 1.5 + SLACK
    assert state.is_failed() and state.name == "TimedOut"
    assert "test_flow" in state.message and "1.5 s" in state.message
    with pytest.raises(TimeoutError):
        state.result()


@pytest.mark.parametrize("runner, backend", ASYNC_CASES, indirect=["runner"])
def test_an_async_flow_past_its_limit_is_timed_out(runner, backend, tmp_path):
    @task
    async def nap(counter):
        return (await stuck.asleep(counter, seconds=60)).result()

    @flow(task_runner=runner.make(), timeout_seconds=1.5)
    async def test_flow():
        return await (await nap(str(tmp_path / "counter"))).result()

    begun = time.monotonic()
    state = anyio.run(test_flow, backend=backend)
    assert time.monotonic() - begun < 1.5 + SLACK
    assert state.name == "TimedOut"


def test_a_flow_within_its_limit_completes(runner):
    @task
    def double(x):
        return 2 * x

    @flow(task_runner=runner.make(), timeout_seconds=60)
    def test_flow():
        return [double(x).result() for x in range(3)]

    assert test_flow().result() == [0, 2, 4]


@pytest.mark.parametrize(
    "make",
    [
        lambda: task(timeout_seconds=0)(lambda: None),
        lambda: task(timeout_seconds=-2),
        lambda: flow(timeout_seconds=float("inf")),
        lambda: taskrunners.flows.Flow(lambda: None, timeout_seconds=0.0),
        lambda: RunnerExecutor(taskrunners.sync.SequentialTaskRunner(), call_timeout=0),
    ],
)
def test_a_limit_that_is_not_positive_is_refused_naming_the_argument(make):
    with pytest.raises(ValueError, match="timeout_seconds|call_timeout"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: task(timeout_seconds="1"),
        lambda: flow(timeout_seconds=[1]),
        lambda: RunnerExecutor(taskrunners.sync.SequentialTaskRunner(), call_timeout="1"),
    ],
)
def test_a_limit_that_is_not_a_number_is_refused_naming_the_argument(make):
    with pytest.raises(TypeError, match="timeout_seconds|call_timeout"):
        make()


# -- the executor ------------------------------------------------------------------------


def _stuck_then(n):
    if n == 1:
        while True:
            pass
    return n * 10


@pytest.mark.parametrize("kind", kind_params([k for k in all_kinds() if not k.twin_only]), indirect=True)
def test_the_executor_call_timeout_applies_to_every_call(kind, request):
    with RunnerExecutor(kind.make(request, blocking=True), call_timeout=LIMIT) as executor:
        futures = [executor.submit(_stuck_then, n) for n in range(3)]
        with pytest.raises(TimeoutError):
            futures[1].result(timeout=LIMIT + SLACK + 10)
        assert futures[0].result() == 0 and futures[2].result() == 20
        results = executor.map(_stuck_then, range(3))
        assert next(results) == 0
        with pytest.raises(TimeoutError):
            next(results)


# -- the in-process runners --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
def test_concurrent_with_one_worker_leaves_a_call_blocked_in_c_behind(mode, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        module = taskrunners.sync if mode == "sync" else taskrunners
        with driving(module.ConcurrentTaskRunner(max_workers=1), mode) as driver:
            with driver.start():
                # Many calls first: the pool's threads then hold idle credit, which must
                # not outlive the thread abandoned below.
                for future in [driver.submit(stuck.quick, {"value": n}) for n in range(200)]:
                    driver.wait(future)
                counter = str(tmp_path / "counter")
                blocked = driver.submit(stuck.reading, {"counter": counter, "port": port}, timeout_seconds=LIMIT)
                after = driver.submit(stuck.quick, {"value": "next"})
                assert driver.wait(blocked, timeout=LIMIT + SLACK).name == "TimedOut"
                # The blocked thread no longer holds the only place.
                assert driver.wait(after, timeout=SLACK).result() == "next"
                # Nor does the runner wait for it when its block ends.
                begun = time.monotonic()
        assert time.monotonic() - begun < SLACK


_MAIN_THREAD_SCRIPT = """
import signal, socket, sys, threading, time
import taskrunners.sync
from taskrunners import TaskRun
from tests.support import stuck

counter, flow_counter = sys.argv[1], sys.argv[2]
before = threading.active_count()
with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    with taskrunners.sync.SequentialTaskRunner().start() as runner:
        begun = time.monotonic()
        future = runner.submit(
            TaskRun(), stuck.reading, {"counter": counter, "port": port}, timeout_seconds=1
        )
        took = time.monotonic() - begun
        state = runner.wait(future)

    @taskrunners.flow(task_runner=taskrunners.sync.SequentialTaskRunner(), timeout_seconds=1)
    def reads():
        return stuck.reading(flow_counter, port)

    flow_state = reads()
# In this very thread: submit returned because the read was interrupted, and no
# helper thread was left blocked in it.
print(state.name, round(took, 1), threading.active_count() - before,
      signal.getsignal(signal.SIGALRM) is signal.SIG_DFL, flow_state.name)
"""


def test_sequential_in_the_main_thread_interrupts_a_blocking_read(tmp_path):
    # In a process of its own: pytest-timeout holds SIGALRM in this one, and the
    # runner then leaves it alone (it would run the call on a helper thread).
    counter, flow_counter = str(tmp_path / "counter"), str(tmp_path / "flow")
    result = run_python("-c", _MAIN_THREAD_SCRIPT, counter, flow_counter, timeout=60, check=True)
    name, took, threads_left, handler_restored, flow_name = result.stdout.split()
    assert name == "TimedOut" and float(took) < LIMIT + SLACK
    assert int(threads_left) <= 1  # the watchdog's thread at most; a helper thread would be 2
    assert handler_restored == "True"
    assert flow_name == "TimedOut"
    assert stuck.count(counter) == 1 and stuck.count(flow_counter) == 1


def test_sequential_in_another_thread_leaves_a_blocked_call_behind(tmp_path):
    states = []

    def drive():
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(8)
            with taskrunners.sync.SequentialTaskRunner().start() as runner:
                future = runner.submit(
                    TaskRun(), stuck.reading,
                    {"counter": str(tmp_path / "counter"), "port": server.getsockname()[1]},
                    timeout_seconds=LIMIT,
                )
                states.append(runner.wait(future))
                states.append(runner.wait(runner.submit(TaskRun(), stuck.quick, {"value": 1})))

    thread = threading.Thread(target=drive)
    thread.start()
    thread.join(LIMIT + SLACK)
    assert not thread.is_alive()
    assert states[0].name == "TimedOut" and states[1].result() == 1
