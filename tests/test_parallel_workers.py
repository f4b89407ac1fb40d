"""ParallelTaskRunner's workers one by one: a dead worker costs only its own calls, and
workers are recycled by call count (``max_calls_per_worker``) and resident memory
(``worker_memory_limit``), losing and repeating no call."""

from __future__ import annotations

import collections
import time

import psutil
import pytest

import taskrunners
from taskrunners import TaskRun, flow, task
from taskrunners.sync import ParallelTaskRunner
from tests.support import parallel_payloads, payloads
from tests.support.kinds import all_kinds, parametrize_kinds
from tests.support.waiting import wait_for_path, wait_until

pytestmark = pytest.mark.timeout(180)

PARALLEL_KIND = parametrize_kinds(kind for kind in all_kinds() if kind.id == "parallel")
# Five rounds, each worker death in turn.
DEATHS = ["exit", "sigkill", "segfault", "exit", "sigkill"]
DEATH_MESSAGES = {
    "exit": "exited with code 3",
    "sigkill": "was killed by SIGKILL (exit code -9)",
    "segfault": "was killed by SIGSEGV (exit code -11)",
}


# -- a dead worker costs only its own calls ------------------------------------------------


@PARALLEL_KIND
def test_a_call_beside_a_dying_worker_completes_every_time(driver):
    """Twin, asyncio and trio: with 2 workers, a call that sleeps 2 s beside one that
    kills its own worker after 0.5 s is Completed, five times over one pool."""
    with driver.start():
        for round, how in enumerate(DEATHS):
            sleeper = driver.submit(
                parallel_payloads.sleep_and_return, {"seconds": 2, "value": round}
            )
            dying = driver.submit(parallel_payloads.die_after, {"seconds": 0.5, "how": how})
            dying_state, sleeper_state = driver.wait(dying), driver.wait(sleeper)
            assert sleeper_state.is_completed(), (how, sleeper_state)
            value, sleeper_pid = sleeper_state.result()
            assert value == round
            assert dying_state.is_crashed() and DEATH_MESSAGES[how] in dying_state.message
            assert f"(pid {sleeper_pid})" not in dying_state.message
        assert driver.run(payloads.return_value, {"value": "after"}).result() == "after"


def test_a_task_beside_a_dying_worker_completes_every_time_in_a_flow():
    @task
    def sleeper(value):
        time.sleep(2)
        return value

    @task
    def dying(how):
        time.sleep(0.5)
        parallel_payloads.die(how)

    @flow(task_runner=taskrunners.ParallelTaskRunner(max_workers=2))
    def beside_a_death():
        rounds = []
        for round, how in enumerate(DEATHS):
            slept, died = sleeper.submit(round), dying.submit(how)
            rounds.append((slept.wait(), died.wait()))
        return rounds

    rounds = beside_a_death().result()
    assert len(rounds) == len(DEATHS)
    for round, ((slept, died), how) in enumerate(zip(rounds, DEATHS)):
        assert slept.is_completed() and slept.result() == round
        assert died.is_crashed() and DEATH_MESSAGES[how] in died.message


def test_a_worker_dying_mid_batch_leaves_the_other_workers_batch_whole(tmp_path):
    """Worker 0 runs batch A, whose third call exits it while worker 1 runs batch B:
    B is delivered whole; of A, the calls that finished are Crashed (lost with their
    worker), the one running is Crashed, those not started run elsewhere; no call
    runs twice."""
    log, running = str(tmp_path / "starts"), str(tmp_path / "b-running")
    gates = {name: tmp_path / f"gate-{name}" for name in ("0a", "0b", "1a", "1b")}
    with ParallelTaskRunner(max_workers=2, batch_size=5).start() as runner:
        pool = runner._pool
        # Every place of both workers held: worker 0 by 0a, 0b; worker 1 by 1a, 1b.
        holders = {
            name: runner.submit(
                TaskRun(name=f"hold-{name}"),
                payloads.run_once_gate_opens,
                {"marker": str(tmp_path / f"held-{name}"), "gate": str(gates[name])},
            )
            for name in ("0a", "1a", "0b", "1b")
        }
        wait_for_path(str(tmp_path / "held-0a"))
        wait_for_path(str(tmp_path / "held-1a"))
        batch_b = [
            runner.submit(
                TaskRun(name=f"b{i}"),
                parallel_payloads.record_mark_and_sleep,
                {"log": log, "tag": f"b{i}", "marker": running, "seconds": 0.3},
            )
            for i in range(5)
        ]
        batch_a = [
            runner.submit(
                TaskRun(name=f"a{i}"),
                parallel_payloads.record_then_die_once,
                {"log": log, "tag": f"a{i}", "marker": running, "die_here": i == 2},
            )
            for i in range(5)
        ]
        runner.wait(batch_b[0], timeout=0)  # sent, as one batch, waiting for a place
        gates["1a"].touch()  # B takes 1a's place, behind 1b
        runner.wait(holders["1a"])
        wait_until(lambda: not pool._ready and pool._load == [2, 2])
        runner.wait(batch_a[0], timeout=0)
        gates["0a"].touch()  # A takes 0a's place, behind 0b
        runner.wait(holders["0a"])
        wait_until(lambda: not pool._ready and pool._load == [2, 2])
        gates["0b"].touch()
        gates["1b"].touch()
        b_states = [runner.wait(future) for future in batch_b]
        a_states = [runner.wait(future) for future in batch_a]

    assert all(state.is_completed() for state in b_states), b_states
    assert [state.result()[0] for state in b_states] == [f"b{i}" for i in range(5)]
    (b_pid,) = {state.result()[1] for state in b_states}
    for i in (0, 1):  # finished, but lost with their batch
        assert a_states[i].is_crashed()
        assert f"Task run 'a{i}' finished in worker process" in a_states[i].message
        assert "exited with code 3 before its result reached this process" in a_states[i].message
    assert a_states[2].is_crashed() and "running task run 'a2' died" in a_states[2].message
    assert f"(pid {b_pid})" not in a_states[2].message
    assert [state.result()[0] for state in a_states[3:]] == ["a3", "a4"]
    assert parallel_payloads.started_calls(log) == sorted(
        [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    )


# -- recycling -------------------------------------------------------------------------------


def test_max_calls_per_worker_replaces_workers_without_losing_or_repeating_calls(tmp_path):
    log = str(tmp_path / "starts")
    with ParallelTaskRunner(max_workers=2, max_calls_per_worker=3).start() as runner:
        futures = [
            runner.submit(
                TaskRun(name=f"c{i}"),
                parallel_payloads.record_and_return_pid,
                {"log": log, "tag": f"c{i}"},
            )
            for i in range(20)
        ]
        pids = [runner.wait(future).result() for future in futures]
    calls_per_pid = collections.Counter(pids)
    assert len(calls_per_pid) >= 7, calls_per_pid
    assert max(calls_per_pid.values()) <= 3, calls_per_pid
    assert parallel_payloads.started_calls(log) == sorted(f"c{i}" for i in range(20))


@pytest.mark.parametrize("batch_size", [1, "auto"])
def test_a_worker_above_its_memory_limit_is_replaced_before_its_next_call(batch_size):
    # Each call keeps 50 MB: a worker holds four at most before it is above 200 MB.
    with ParallelTaskRunner(
        max_workers=2, worker_memory_limit="200MB", batch_size=batch_size
    ).start() as runner:
        futures = [
            runner.submit(TaskRun(name=f"c{i}"), parallel_payloads.keep_megabytes, {"megabytes": 50})
            for i in range(12)
        ]
        states = [runner.wait(future) for future in futures]
    assert all(state.is_completed() for state in states), states
    calls_per_pid = collections.Counter(state.result() for state in states)
    assert len(calls_per_pid) >= 3, calls_per_pid
    assert max(calls_per_pid.values()) <= 4, calls_per_pid


def test_a_call_that_alone_goes_past_the_memory_limit_is_crashed_naming_it():
    with ParallelTaskRunner(max_workers=2, worker_memory_limit="100MB").start() as runner:
        state = runner.wait(
            runner.submit(TaskRun(name="greedy"), parallel_payloads.keep_megabytes, {"megabytes": 150})
        )
        after = runner.wait(runner.submit(TaskRun(), payloads.return_pid, {}))
    assert state.is_crashed()
    assert "Task run 'greedy' took worker process (pid" in state.message
    assert "above worker_memory_limit=100 MB" in state.message
    assert isinstance(state.result(raise_on_failure=False), MemoryError)
    assert after.is_completed()


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, size",
    [(None, None), (1000, 1000), ("200MB", 200 * 10**6), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29),
     ("512 kib", 512 * 1024), ("10b", 10)],
)
def test_worker_memory_limit_takes_bytes_or_a_size_with_a_unit(value, size):
    for runner_class in (ParallelTaskRunner, taskrunners.ParallelTaskRunner):
        assert runner_class(worker_memory_limit=value).worker_memory_limit == size


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "", "lots", "200XB", "-1MB", "0MB", [200]])
def test_a_bad_worker_memory_limit_is_refused_naming_it(value):
    for runner_class in (ParallelTaskRunner, taskrunners.ParallelTaskRunner):
        with pytest.raises(ValueError, match="`worker_memory_limit` must be"):
            runner_class(worker_memory_limit=value)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_a_bad_max_calls_per_worker_is_refused_naming_it(value):
    for runner_class in (ParallelTaskRunner, taskrunners.ParallelTaskRunner):
        with pytest.raises(ValueError, match="`max_calls_per_worker` must be a positive integer"):
            runner_class(max_calls_per_worker=value)
        assert runner_class(max_calls_per_worker=4).max_calls_per_worker == 4


def test_recycled_workers_are_gone_when_the_block_ends():
    with ParallelTaskRunner(max_workers=2, max_calls_per_worker=1).start() as runner:
        futures = [runner.submit(TaskRun(), payloads.return_pid, {}) for _ in range(6)]
        pids = {runner.wait(future).result() for future in futures}
    assert len(pids) == 6
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []
