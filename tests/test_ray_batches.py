"""RayTaskRunner batches: many short calls as few Ray tasks, with every per-call rule kept.

The standard suite runs on Ray with ``batch_size="auto"`` and ``1``
(tests/support/kinds_ray.py); these tests make batches on purpose and look inside
them. To gather calls, the runner's dispatcher is first filled with sleepers that
hold no CPU and wait for the test's go-ahead (a gate file): calls submitted then wait
in the runner, grouped, until a sleeper comes back or somebody waits for one of them.
No assertion depends on timing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

import pytest

import taskrunners.sync
from taskrunners import TaskRun
from taskrunners._core.ray.options import ray_options
from taskrunners._core.ray.sending import RaySender
from taskrunners._core.seam import call_of
from tests.support import payloads, ray_payloads
from tests.support.pickling import register_payloads
from tests.support.waiting import wait_for_path

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

CANCELLED = "Execution was cancelled by the runtime environment."


@pytest.fixture(autouse=True)
def _shared_ray(ray_session):
    """The session's Ray instance, with the test run_fns sent by value."""
    import ray

    register_payloads(ray.cloudpickle)
    ray_session.shared()


def lines(path):
    return Path(path).read_text().splitlines() if Path(path).exists() else []


@contextlib.contextmanager
def dispatcher_filled(runner, tmp_path):
    """Fill every place for a Ray task out with a sleeper holding no CPU, which returns
    once the test creates the gate file: when the block is left normally. Yields the
    gate's path. Leaving it with an exception leaves the sleepers to the runner's exit
    (the gate is created at teardown)."""
    gate = tmp_path / "gate"
    with ray_options(num_cpus=0):
        sleepers = [
            runner.submit(
                TaskRun(),
                payloads.run_once_gate_opens,
                {"marker": str(tmp_path / f"sleeper{n}"), "gate": str(gate)},
            )
            for n in range(runner._sender.dispatcher.limit)
        ]
    assert runner._sender.dispatcher.out == len(sleepers)
    yield gate
    gate.touch()
    for sleeper in sleepers:
        runner.wait(sleeper)


@pytest.fixture(autouse=True)
def _open_gate(tmp_path):
    yield
    (tmp_path / "gate").touch()  # sleepers a test left behind end


def submit_acts(runner, tmp_path, hows):
    """One ray_payloads.act call per item of ``hows``; their futures and markers."""
    markers = [str(tmp_path / f"call{n}") for n in range(len(hows))]
    futures = [
        runner.submit(TaskRun(), ray_payloads.act, {"how": how, "marker": marker, "value": n})
        for n, (how, marker) in enumerate(zip(hows, markers))
    ]
    return futures, markers


def test_many_short_calls_share_a_few_ray_tasks_and_a_slow_task_goes_alone(tmp_path):
    runner = taskrunners.sync.RayTaskRunner()  # batch_size="auto"
    with runner.start():
        with dispatcher_filled(runner, tmp_path):
            short = [runner.submit(TaskRun(), ray_payloads.ray_task_id, {}) for _ in range(400)]
            numbers = [runner.submit(TaskRun(), payloads.return_value, {"value": n}) for n in range(100)]
            assert runner._sender.dispatcher.gathered == 500
        task_ids = [runner.wait(future).result() for future in short]
        # Downstream calls find their upstream's State at its place in its batch.
        sums = [
            runner.submit(TaskRun(), payloads.add_upstream, {"upstream": future, "y": 1})
            for future in numbers
        ]
        assert [runner.wait(future).result() for future in sums] == [n + 1 for n in range(100)]
        assert any(call_of(future).position for future in numbers)
        slow = [
            runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 0.2, "value": n})
            for n in range(6)
        ]
        assert [runner.wait(future).result() for future in slow] == list(range(6))
    # The first calls of a new task go alone, until one is measured; then they go by
    # the tens or hundreds: sizes follow the durations measured, which a loaded machine
    # stretches, so the bound is loose (20 on a quiet machine; 400 without batching).
    assert len(set(task_ids)) <= 50, len(set(task_ids))
    assert len({call_of(future).ref for future in short}) == len(set(task_ids))
    # A call of 0.2 s is a Ray task of its own, as without batching.
    assert all(call_of(future).position is None for future in slow)
    assert len({call_of(future).ref for future in slow}) == 6


def test_a_raising_call_in_a_batch_affects_no_other_call(tmp_path):
    runner = taskrunners.sync.RayTaskRunner(batch_size=10)
    with runner.start():
        with dispatcher_filled(runner, tmp_path):
            futures, markers = submit_acts(
                runner, tmp_path, ["return", "raise", "return", "not-a-state", "return"]
            )
            states = [runner.wait(future) for future in futures]  # the first wait sends them all
    assert len({call_of(future).ref for future in futures}) == 1, "one batch"
    assert [state.result() for state in (states[0], states[2], states[4])] == [0, 2, 4]
    raised = states[1].result(raise_on_failure=False)
    assert states[1].is_crashed() and type(raised) is LookupError and raised.args == (1,)
    assert states[3].is_crashed() and "returned int, not a State" in states[3].message
    assert [len(lines(marker)) for marker in markers] == [1] * 5


def test_a_worker_killed_mid_batch(tmp_path):
    """The running call is Crashed naming the cause, those finished lost their results,
    those not started run elsewhere; no call starts twice."""
    runner = taskrunners.sync.RayTaskRunner(batch_size=10)
    with runner.start():
        with dispatcher_filled(runner, tmp_path):
            futures, markers = submit_acts(
                runner, tmp_path, ["return", "return", "exit", "return", "return"]
            )
            runner.wait(futures[0])  # sends all five as one batch
        states = [runner.wait(future) for future in futures]
        assert runner.wait(runner.submit(TaskRun(), payloads.add, {"x": 1, "y": 2})).result() == 3
    names = [future.task_run.name for future in futures]
    for lost in (0, 1):
        assert states[lost].is_crashed(), states[lost]
        assert states[lost].message.startswith(
            f"Call {names[lost]!r} finished in a Ray worker that died before the results of "
            "its batch reached this process: its result was lost with the worker, and it "
            "was not run again. Ray: WorkerCrashedError: "
        )
    assert states[2].is_crashed() and states[2].message.startswith(
        f"The Ray worker process running call {names[2]!r} died mid-call (killed, or it "
        "exited); the call was not retried (max_retries=0). Ray: WorkerCrashedError: "
    )
    assert type(states[2].result(raise_on_failure=False)).__name__ == "WorkerCrashedError"
    assert [states[3].result(), states[4].result()] == [3, 4]
    pids = [lines(marker) for marker in markers]
    assert all(len(ran) == 1 for ran in pids), pids  # every call started exactly once
    assert pids[0] == pids[1] == pids[2] and pids[3][0] != pids[2][0]


def test_a_wait_begun_before_its_batch_died_ends_when_the_call_runs_again(tmp_path):
    """A wait expedites its call once: a call sent again after its worker died, while
    every place is taken, must go at once rather than wait for a place."""
    runner = taskrunners.sync.RayTaskRunner(batch_size=10)
    exit_gate = tmp_path / "exit"
    with runner.start():
        with dispatcher_filled(runner, tmp_path):
            futures = [
                runner.submit(
                    TaskRun(),
                    ray_payloads.act,
                    {"how": how, "marker": str(tmp_path / f"call{n}"), "value": value},
                )
                for n, (how, value) in enumerate([("exit-at-gate", str(exit_gate)), ("return", 1)])
            ]
            runner.wait(futures[0], timeout=0)  # sends both as one batch
            wait_for_path(tmp_path / "call0", patience=150)  # the batch is running
            # The worker exits only after the wait below has begun (a late start would
            # find the call gathered, and pass too): no timing is asserted.
            threading.Timer(1.0, exit_gate.touch).start()
            # Sleepers hold every place till the block ends: without the call going
            # at once, this wait would last until they give up (150 s).
            state = runner.wait(futures[1], timeout=60)
            assert state is not None, "the call sent again waited for a place"
            assert state.result() == 1
            assert runner.wait(futures[0]).is_crashed()
    assert lines(tmp_path / "call1") and len(lines(tmp_path / "call1")) == 1


def test_a_worker_that_cannot_mark_its_calls_runs_none_again(tmp_path):
    """As on another machine: whether the calls after the first had started is unknown."""
    runner = taskrunners.sync.RayTaskRunner(batch_size=10)
    with runner.start():
        os.unlink(runner._sender.slots.path)  # the workers cannot open the table
        with dispatcher_filled(runner, tmp_path):
            futures, markers = submit_acts(runner, tmp_path, ["return", "exit", "return", "return"])
            states = [runner.wait(future) for future in futures]
    assert states[0].is_crashed() and "died mid-call" in states[0].message
    for state, future in zip(states[1:], futures[1:]):
        assert state.is_crashed(), state
        assert state.message.startswith(
            f"The Ray worker running the batch of call {future.task_run.name!r} died, and "
            "whether the call had started is unknown (a worker on another machine cannot "
            "mark the calls it starts): it was not run again, so that no call ever runs twice."
        )
    assert [len(lines(marker)) for marker in markers] == [1, 1, 0, 0]


def test_gathered_calls_are_cancelled_when_the_block_is_left_with_an_exception(tmp_path):
    runner = taskrunners.sync.RayTaskRunner()
    with pytest.raises(LookupError, match="leave"):
        with runner.start():
            with dispatcher_filled(runner, tmp_path):
                futures, markers = submit_acts(runner, tmp_path, ["return"] * 20)
                assert runner._sender.dispatcher.gathered == 20
                raise LookupError("leave")
    for future in futures:
        state = runner.wait(future, timeout=0)
        assert state.is_crashed() and state.message == CANCELLED
        assert call_of(future).cancelled()
    assert all(not lines(marker) for marker in markers), "gathered calls never start"


def test_waiting_for_a_gathered_call_sends_it_at_once(tmp_path):
    """Neither a lone call nor one gathered behind busy workers waits for a batch to fill."""
    runner = taskrunners.sync.RayTaskRunner(batch_size=1000)
    with runner.start():
        lone = runner.submit(TaskRun(), payloads.return_value, {"value": "lone"})
        assert runner.wait(lone).result() == "lone"
        assert call_of(lone).position is None  # went at once, alone
        with dispatcher_filled(runner, tmp_path) as gate:
            gathered = runner.submit(TaskRun(), payloads.return_value, {"value": "gathered"})
            assert runner._sender.dispatcher.gathered == 1
            assert runner.wait(gathered).result() == "gathered"
            assert not gate.exists(), "the sleepers had not come back"


def test_calls_with_different_options_never_share_a_batch_and_each_batch_carries_them(tmp_path):
    runner = taskrunners.sync.RayTaskRunner(batch_size=10)
    with runner.start():
        with dispatcher_filled(runner, tmp_path):
            plain = [runner.submit(TaskRun(), ray_payloads.assigned_resources, {}) for _ in range(3)]
            with ray_options(num_cpus=0.5):
                half = [runner.submit(TaskRun(), ray_payloads.assigned_resources, {}) for _ in range(3)]
            with ray_options(resources={"test-slot": 1}):
                slot = [runner.submit(TaskRun(), ray_payloads.assigned_resources, {}) for _ in range(3)]
            for future in (plain[0], half[0], slot[0]):
                runner.wait(future)  # each sends its group, as one batch
        results = [[runner.wait(future).result() for future in group] for group in (plain, half, slot)]
    assert results == [
        [{"CPU": 1.0}] * 3,
        [{"CPU": 0.5}] * 3,
        [{"CPU": 1.0, "test-slot": 1.0}] * 3,
    ]
    refs = [{call_of(future).ref for future in group} for group in (plain, half, slot)]
    assert all(len(group) == 1 for group in refs) and len(set.union(*refs)) == 3


def test_a_batch_ray_cannot_take_goes_again_call_by_call(tmp_path, monkeypatch):
    """An argument Ray cannot pickle here, or a worker cannot unpickle, fails its call only."""
    module = tmp_path / "only_in_this_process.py"
    module.write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_in_this_process  # the workers cannot import it

    runner = taskrunners.sync.RayTaskRunner(batch_size=10)
    with runner.start():
        with dispatcher_filled(runner, tmp_path):
            values = [1, only_in_this_process.Thing(), 3, __import__("threading").Lock(), 5]
            futures = [
                runner.submit(TaskRun(), payloads.return_value, {"value": value}) for value in values
            ]
            states = [runner.wait(future) for future in futures]
    assert [states[n].result() for n in (0, 2, 4)] == [1, 3, 5]
    assert states[1].is_crashed() and "No module named 'only_in_this_process'" in states[1].message
    assert states[3].is_crashed() and states[3].message.startswith(
        f"Ray could not submit the call {futures[3].task_run.name!r}: TypeError"
    )
    sys.modules.pop("only_in_this_process", None)


def test_a_task_map_through_flows_is_batched_per_task(monkeypatch):
    """Two tasks run through the flows' one wrapper are measured and batched apart."""
    from taskrunners import flow, task

    batches = []
    send_batch = RaySender._submit_batch

    def spy(self, live, remote):
        batches.append([entry.key for entry in live])
        return send_batch(self, live, remote)

    monkeypatch.setattr(RaySender, "_submit_batch", spy)

    @task
    def double(x):
        return 2 * x

    @task
    def negate(x):
        return -x

    @flow(task_runner=taskrunners.RayTaskRunner())
    def doubled_and_negated(n):
        return double.map(range(n)), negate.map(range(n))

    doubled, negated = doubled_and_negated(300).result()
    assert [s.result() for s in doubled] == [2 * x for x in range(300)]
    assert [s.result() for s in negated] == [-x for x in range(300)]
    assert all(len(set(keys)) == 1 for keys in batches), "one task per batch"
    assert {keys[0] for keys in batches if len(keys) > 1} == {double, negate}
