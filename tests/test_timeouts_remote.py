"""Timeouts on the runners that end a stuck call's worker process: Parallel and Ray.

A call past its limit ends its worker; the calls beside it are untouched: a call in
the other worker completes, the calls of its batch that had finished are delivered,
those not started run on a fresh worker, each exactly once, and the runner stays
usable. The standard behaviour every runner shares is tests/test_timeouts.py.
"""

from __future__ import annotations

import os
import time

import pytest

import taskrunners
from taskrunners import TaskRun, flow, task
from taskrunners._core.parallel.pool import PLACES_PER_WORKER, ProcessPool
from taskrunners._core.ray.options import ray_options
from taskrunners._core.seam import call_of
from taskrunners.states import StateType
from taskrunners.sync import ParallelTaskRunner, RayTaskRunner
from tests.support import payloads, stuck
from tests.support.driver import driving
from tests.support.pickling import register_payloads
from tests.support.waiting import wait_for_path

pytestmark = pytest.mark.timeout(240)

# From the limit to the State, at most: "about a second", with room for a loaded machine.
SLACK = 8.0


def timed_out(state, seconds):
    assert state is not None
    assert state.type is StateType.FAILED and state.name == "TimedOut", state
    assert f"{seconds:g} s" in state.message, state.message
    with pytest.raises(TimeoutError):
        state.result()
    return True


@pytest.fixture
def ray_shared(ray_session):
    """The session's Ray instance, with the test payloads sent by value."""
    import ray

    register_payloads(ray.cloudpickle)
    return ray_session.shared()


def parallel_runner(facade=False, **kwargs):
    module = taskrunners if facade else taskrunners.sync
    return module.ParallelTaskRunner(max_workers=2, **kwargs)


# -- a call beside one that times out --------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
def test_parallel_a_call_beside_one_that_times_out_completes(mode, tmp_path):
    counter = str(tmp_path / "counter")
    with driving(parallel_runner(facade=mode != "sync"), mode) as driver, driver.start():
        slow = driver.submit(stuck.nap_then, {"value": "slept", "seconds": 2.0})
        late = driver.submit(stuck.sleeping, {"counter": counter}, timeout_seconds=0.5)
        begun = time.monotonic()
        assert timed_out(driver.wait(late), 0.5)
        assert time.monotonic() - begun < 0.5 + SLACK
        assert driver.wait(slow).result() == "slept"


def test_ray_a_call_beside_one_that_times_out_completes(ray_shared, tmp_path):
    counter = str(tmp_path / "counter")
    with RayTaskRunner(address=ray_shared).start() as runner:
        slow = runner.submit(TaskRun(), stuck.nap_then, {"value": "slept", "seconds": 2.0})
        late = runner.submit(TaskRun(), stuck.sleeping, {"counter": counter}, timeout_seconds=0.5)
        assert timed_out(runner.wait(late), 0.5)
        assert runner.wait(slow).result() == "slept"


def test_parallel_in_a_flow_a_task_beside_one_that_times_out_completes(tmp_path):
    counter = str(tmp_path / "counter")

    @task
    def slow():
        time.sleep(2.0)
        return "slept"

    @task(timeout_seconds=0.5)
    def late(counter):
        stuck.sleeping(counter)

    @flow(task_runner=taskrunners.ParallelTaskRunner(max_workers=2))
    def both():
        first = slow.submit()
        second = late.submit(counter).wait()
        with pytest.raises(TimeoutError):
            second.result()
        return first.result(), second.name

    assert both().result() == ("slept", "TimedOut")


# -- every form of wait sees it ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["parallel", "ray"])
def test_every_form_of_wait_sees_the_timed_out_state(backend, request, tmp_path):
    if backend == "ray":
        runner = RayTaskRunner(address=request.getfixturevalue("ray_shared"))
    else:
        runner = parallel_runner()
    with runner.start():
        for form in ("wait", "future.wait", "future.result", "taskrunners.wait", "as_completed"):
            counter = str(tmp_path / f"counter-{form}")
            future = runner.submit(TaskRun(), stuck.busy, {"counter": counter}, timeout_seconds=1.0)
            begun = time.monotonic()
            if form == "wait":
                state = runner.wait(future)
            elif form == "future.wait":
                state = future.wait()
            elif form == "future.result":
                with pytest.raises(TimeoutError):
                    future.result()
                state = future.wait(0)
            elif form == "taskrunners.wait":
                done, _ = taskrunners.wait([future])
                state = next(iter(done)).wait(0)
            else:
                state = next(iter(taskrunners.as_completed([future]))).wait(0)
            assert timed_out(state, 1.0), form
            assert time.monotonic() - begun < 1.0 + SLACK, form


# -- a batch with a call that times out -----------------------------------------------------------


def _batch_of_eight(submit, tmp_path, stuck_at=3):
    counters = [str(tmp_path / f"counter-{n}") for n in range(8)]
    futures = [
        submit(stuck.busy_if, {"value": n, "counter": counters[n], "stuck": n == stuck_at})
        for n in range(8)
    ]
    return futures, counters


def _each_ran_once(states, counters, stuck_at=3):
    for n, state in enumerate(states):
        if n == stuck_at:
            assert timed_out(state, 1.0)
        else:
            assert state.result() == n, state  # delivered, not "lost"
        assert stuck.count(counters[n]) == 1, f"call {n} ran {stuck.count(counters[n])} times"


def test_parallel_a_batch_with_a_call_that_times_out_delivers_each_other_once(tmp_path, monkeypatch):
    batches = []
    hand_over = ProcessPool._hand_over

    def spy(self, batch, index, manager_of):  # pass-through: which calls share a loky task
        outcome = hand_over(self, batch, index, manager_of)
        if outcome == "sent":
            batches.append(list(batch.names))
        return outcome

    monkeypatch.setattr(ProcessPool, "_hand_over", spy)
    gate = tmp_path / "gate"
    with ParallelTaskRunner(max_workers=2, batch_size=8).start() as runner:
        # Both workers held, and their places full: the calls below are gathered.
        holders = [
            runner.submit(
                TaskRun(name=f"holder-{n}"),
                payloads.run_once_gate_opens,
                {"marker": str(tmp_path / f"held-{n}"), "gate": str(gate)},
            )
            for n in range(2 * PLACES_PER_WORKER)
        ]
        wait_for_path(tmp_path / "held-0")
        futures, counters = _batch_of_eight(
            lambda run_fn, kwargs: runner.submit(TaskRun(name=f"c{kwargs['value']}"), run_fn, kwargs, timeout_seconds=1.0),
            tmp_path,
        )
        runner.wait(futures[0], timeout=0)  # sends the eight together
        gate.touch()
        states = [runner.wait(future) for future in futures]
        assert all(runner.wait(holder).is_completed() for holder in holders)
        assert runner.wait(runner.submit(TaskRun(), stuck.quick, {"value": "after"})).result() == "after"
    assert [f"c{n}" for n in range(8)] in batches
    _each_ran_once(states, counters)


def test_ray_a_batch_with_a_call_that_times_out_delivers_each_other_once(ray_shared, tmp_path):
    gate = tmp_path / "gate"
    with RayTaskRunner(address=ray_shared, batch_size=8).start() as runner:
        with ray_options(num_cpus=0):  # sleepers that fill every place for a task out
            sleepers = [
                runner.submit(
                    TaskRun(),
                    payloads.run_once_gate_opens,
                    {"marker": str(tmp_path / f"sleeper{n}"), "gate": str(gate)},
                )
                for n in range(runner._sender.dispatcher.limit)
            ]
        try:
            futures, counters = _batch_of_eight(
                lambda run_fn, kwargs: runner.submit(TaskRun(), run_fn, kwargs, timeout_seconds=1.0),
                tmp_path,
            )
            runner.wait(futures[0], timeout=0)  # sends the eight together
        finally:
            gate.touch()
        states = [runner.wait(future) for future in futures]
        assert all(runner.wait(sleeper).is_completed() for sleeper in sleepers)
        refs = {call_of(future).ref for future in futures[:3]}
        assert len(refs) == 1 and None not in refs  # the first three were one Ray task
    _each_ran_once(states, counters)


# -- the runner stays usable ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["parallel", "ray"])
def test_after_five_timeouts_in_a_row_twenty_quick_calls_complete(backend, request, tmp_path):
    if backend == "ray":
        runner = RayTaskRunner(address=request.getfixturevalue("ray_shared"))
    else:
        runner = parallel_runner()
    with runner.start():
        for n in range(5):
            counter = str(tmp_path / f"counter-{n}")
            future = runner.submit(TaskRun(), stuck.busy, {"counter": counter}, timeout_seconds=0.5)
            assert timed_out(runner.wait(future), 0.5)
        quick = [runner.submit(TaskRun(), stuck.quick, {"value": n}) for n in range(20)]
        assert [runner.wait(future).result() for future in quick] == list(range(20))


def test_parallel_calls_in_the_other_worker_are_not_touched(tmp_path):
    counters = [str(tmp_path / f"counter-{n}") for n in range(4)]
    with parallel_runner(batch_size=1).start() as runner:
        # Worker A runs naps one after the other; worker B a call that times out, twice.
        naps = []
        for n in range(4):
            naps.append(runner.submit(TaskRun(), stuck.nap_then, {"value": n, "seconds": 0.4, "counter": counters[n]}))
            if n % 2:
                late = runner.submit(TaskRun(), stuck.busy, {"counter": str(tmp_path / f"late-{n}")}, timeout_seconds=0.5)
                assert timed_out(runner.wait(late), 0.5)
        assert [runner.wait(nap).result() for nap in naps] == list(range(4))
    assert [stuck.count(counter) for counter in counters] == [1, 1, 1, 1]


def test_ray_keeps_max_retries_at_zero_for_calls_with_a_limit(ray_shared, tmp_path):
    # A worker that ends at a limit must not make Ray run the task again, whatever the
    # runner's remote_options say.
    counter = str(tmp_path / "counter")
    with RayTaskRunner(address=ray_shared, remote_options={"max_retries": 3}, batch_size=1).start() as runner:
        future = runner.submit(TaskRun(), stuck.sleeping, {"counter": counter, "seconds": 3.0}, timeout_seconds=0.5)
        assert timed_out(runner.wait(future), 0.5)
        time.sleep(3.0)  # a second try would have counted by now
    assert stuck.count(counter) == 1


def test_parallel_calls_queued_behind_calls_that_time_out_each_run_once(tmp_path):
    # A worker holds two calls: one that times out ends the worker with the next one
    # in it, not started, which goes again to a fresh worker, and runs once.
    counters = [str(tmp_path / f"counter-{n}") for n in range(8)]
    with parallel_runner(batch_size=1).start() as runner:
        lates, quick = [], []
        for n in range(8):
            lates.append(runner.submit(TaskRun(), stuck.busy, {"counter": str(tmp_path / f"late-{n}")}, timeout_seconds=0.5))
            quick.append(runner.submit(TaskRun(), stuck.quick, {"value": n, "counter": counters[n]}))
        assert all(timed_out(runner.wait(late), 0.5) for late in lates)
        assert [runner.wait(future).result() for future in quick] == list(range(8))
    assert [stuck.count(counter) for counter in counters] == [1] * 8


def test_ray_without_a_slot_table_a_late_call_is_crashed_naming_its_limit(ray_shared, tmp_path, monkeypatch):
    # As on a worker of another machine, nothing can mark the call timed out: its
    # worker still ends at the limit, and the call is Crashed, saying it may have been
    # the limit; it is not run again.
    from taskrunners._core.ray import sending

    monkeypatch.setattr(sending, "new_slot_table", lambda runs, run_size: None)
    counter = str(tmp_path / "counter")
    with RayTaskRunner(address=ray_shared).start() as runner:
        future = runner.submit(TaskRun(name="late"), stuck.busy, {"counter": counter}, timeout_seconds=0.5)
        state = runner.wait(future)
        assert state.is_crashed(), state
        assert "'late'" in state.message and "perhaps at the call's limit of 0.5 s" in state.message
        assert runner.wait(runner.submit(TaskRun(), stuck.quick, {"value": 1})).result() == 1
    pid = int(open(stuck.pid_file(counter)).read())
    seen = stuck.count(counter)
    time.sleep(0.5)
    assert stuck.count(counter) == seen  # the work stopped with its worker
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {pid} still runs")
