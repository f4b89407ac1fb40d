"""ParallelTaskRunner batches: many calls per loky task, every call with its own State.

Which calls share a loky task is seen through a pass-through spy on the pool's
hand-overs (``handed_over``: the task run names of each loky task, in order). Which
calls ran, and how often, is seen through a log file each call appends its tag to.

Most tests hold the pool's one worker with a call that waits for a gate file, and
fill loky's call queue behind it: calls submitted then are gathered, and waiting for
the first of them sends them as one batch of ``batch_size``, deterministically.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import threading
import time

import pytest

import taskrunners
from taskrunners import TaskRun, flow, task
from taskrunners._core.parallel.pool import PLACES_PER_WORKER, ProcessPool
from taskrunners.states import Completed
from taskrunners.sync import ParallelTaskRunner
from taskrunners._core.seam import call_of
from tests.support import parallel_payloads, payloads
from tests.support.waiting import wait_for_path

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def handed_over(monkeypatch):
    """The task run names of each batch handed to loky, in order (a pass-through spy)."""
    batches = []
    hand_over = ProcessPool._hand_over

    def spy(self, batch, index, manager_of):
        outcome = hand_over(self, batch, index, manager_of)
        if outcome == "sent":
            batches.append(list(batch.names))
        return outcome

    monkeypatch.setattr(ProcessPool, "_hand_over", spy)
    return batches


def batch_of(batches, name):
    return next(batch for batch in batches if name in batch)


@contextlib.contextmanager
def busy_pool(tmp_path, batch_size=10):
    """A started runner whose one worker is held until ``open_gate()``, and its places
    full behind it: calls submitted meanwhile are gathered."""
    gate, marker = tmp_path / "gate", tmp_path / "held"
    with ParallelTaskRunner(max_workers=1, batch_size=batch_size).start() as runner:
        runner.submit(
            TaskRun(name="holder"),
            payloads.run_once_gate_opens,
            {"marker": str(marker), "gate": str(gate)},
        )
        for i in range(PLACES_PER_WORKER - 1):
            runner.submit(TaskRun(name=f"filler-{i}"), payloads.return_value, {"value": i})
        wait_for_path(marker)
        try:
            yield runner, gate.touch
        finally:
            gate.touch()


def gathered(runner):
    return runner._pool._dispatcher.gathered


def submit_recorded(runner, log, count, then=None):
    """``count`` calls of one task, tagged c0, c1, ...; ``then`` maps a tag to what it does."""
    then = then or {}
    return [
        runner.submit(
            TaskRun(name=f"c{i}"),
            parallel_payloads.record_then,
            {"log": log, "tag": f"c{i}", "then": then.get(f"c{i}", "return")},
        )
        for i in range(count)
    ]


# -- which calls share a loky task --------------------------------------------------------


def test_many_short_calls_share_a_few_loky_tasks_and_each_runs_once(tmp_path, handed_over):
    log = str(tmp_path / "starts")
    with ParallelTaskRunner(max_workers=2).start() as runner:
        futures = [
            runner.submit(
                TaskRun(name=f"q{i}"),
                parallel_payloads.record_and_return,
                {"log": log, "tag": f"q{i}", "value": i},
            )
            for i in range(2000)
        ]
        values = [runner.wait(future).result() for future in futures]
    assert values == list(range(2000))
    assert parallel_payloads.started_calls(log) == sorted(f"q{i}" for i in range(2000))
    assert sorted(name for batch in handed_over for name in batch) == sorted(
        f"q{i}" for i in range(2000)
    )
    # How the calls were cut into batches depends on timing; that they were, does not.
    assert len(handed_over) <= 500
    assert max(len(batch) for batch in handed_over) >= 20


def test_a_slow_task_goes_one_call_per_loky_task_beside_a_batched_one(handed_over):
    with ParallelTaskRunner(max_workers=2).start() as runner:
        futures = []
        for i in range(8):
            futures.append(
                runner.submit(
                    TaskRun(name=f"slow-{i}"),
                    payloads.sleep_then_return,
                    {"seconds": 0.15, "value": i},
                )
            )
            futures += [
                runner.submit(TaskRun(name=f"quick-{i}-{j}"), payloads.return_value, {"value": j})
                for j in range(50)
            ]
        states = [runner.wait(future) for future in futures]
    assert all(state.is_completed() for state in states)
    slow = [batch for batch in handed_over if any(name.startswith("slow-") for name in batch)]
    assert slow == [[f"slow-{i}"] for i in range(8)]
    quick = [batch for batch in handed_over if batch not in slow]
    assert max(len(batch) for batch in quick) > 1


def test_two_tasks_of_a_flow_are_measured_apart(handed_over):
    """Both run through the flows' one wrapper function; the task behind it is the key."""

    @task
    def quick(i):
        return i

    @task
    def slow(i):
        time.sleep(0.15)
        return i

    @flow(task_runner=taskrunners.ParallelTaskRunner(max_workers=2))
    def quick_and_slow():
        fast, slowly = quick.map(range(300)), slow.map(range(6))
        return [f.result() for f in fast], [f.result() for f in slowly]

    state = quick_and_slow()
    assert state.result() == (list(range(300)), list(range(6)))
    slow_batches = [batch for batch in handed_over if any(n.startswith("slow") for n in batch)]
    assert sorted(slow_batches) == sorted([name] for batch in slow_batches for name in batch)
    assert len(slow_batches) == 6
    assert max(len(batch) for batch in handed_over if batch not in slow_batches) > 1


@pytest.mark.parametrize("batch_size", [1, 7])
def test_a_fixed_batch_size_caps_every_batch(handed_over, batch_size):
    with ParallelTaskRunner(max_workers=2, batch_size=batch_size).start() as runner:
        futures = [
            runner.submit(TaskRun(name=f"q{i}"), payloads.return_value, {"value": i})
            for i in range(300)
        ]
        assert [runner.wait(future).result() for future in futures] == list(range(300))
    assert max(len(batch) for batch in handed_over) == batch_size
    assert sum(len(batch) for batch in handed_over) == 300


# -- sent at once ---------------------------------------------------------------------------


def test_a_lone_call_goes_at_once_in_a_batch_of_its_own(handed_over):
    with ParallelTaskRunner(max_workers=2).start() as runner:
        future = runner.submit(TaskRun(name="lone"), payloads.return_value, {"value": 1})
        assert runner.wait(future, timeout=60).result() == 1
    assert handed_over == [["lone"]]


def test_a_gathered_call_somebody_waits_for_is_sent_at_once(tmp_path, handed_over):
    log = str(tmp_path / "starts")
    with busy_pool(tmp_path, batch_size="auto") as (runner, open_gate):
        futures = submit_recorded(runner, log, 5)
        assert gathered(runner) == 5
        assert runner.wait(futures[2], timeout=0) is None
        # Sent (the task is new: alone), though loky has no room for it yet.
        assert gathered(runner) == 4 and call_of(futures[2]).running()
        open_gate()
        assert [runner.wait(future).result() for future in futures] == [f"c{i}" for i in range(5)]
    # It went to the worker before the calls gathered before it.
    assert pathlib.Path(log).read_text().split()[0] == "c2"
    assert ["c2"] in handed_over


# -- every call keeps its own outcome inside a batch ----------------------------------------------


def test_a_raising_call_fails_alone_inside_its_batch(tmp_path, handed_over):
    log = str(tmp_path / "starts")
    with busy_pool(tmp_path) as (runner, open_gate):
        futures = submit_recorded(runner, log, 10, then={"c3": "raise"})
        runner.wait(futures[0], timeout=0)  # sends the ten together
        assert gathered(runner) == 0
        open_gate()
        states = [runner.wait(future) for future in futures]
    assert batch_of(handed_over, "c0") == [f"c{i}" for i in range(10)]
    crashed = states.pop(3)
    assert crashed.is_crashed()
    assert crashed.message == "Execution was interrupted by an unexpected exception."
    error = crashed.result(raise_on_failure=False)
    assert type(error) is ValueError and str(error) == "c3 refused"
    assert [state.result() for state in states] == [f"c{i}" for i in range(10) if i != 3]
    assert parallel_payloads.started_calls(log) == sorted(f"c{i}" for i in range(10))


MISBEHAVIOURS = [
    {"how": "raise", "name": name}
    for name in ("ValueError", "KeyboardInterrupt", "SystemExit", "CustomBaseException", "UnpicklableException")
] + [
    {"how": how}
    for how in ("raise-unpicklable-args", "return-unpicklable", "return-non-state", "fail-with-unpicklable")
]


def test_each_call_of_a_batch_ends_as_it_would_alone(tmp_path, handed_over):
    names = [f"c{i}" for i in range(len(MISBEHAVIOURS))]
    with ParallelTaskRunner(max_workers=1, batch_size=1).start() as runner:
        alone = [
            runner.wait(runner.submit(TaskRun(name=name), payloads.misbehave, kwargs))
            for name, kwargs in zip(names, MISBEHAVIOURS)
        ]
    handed_over.clear()
    with busy_pool(tmp_path) as (runner, open_gate):
        futures = [
            runner.submit(TaskRun(name=name), payloads.misbehave, kwargs)
            for name, kwargs in zip(names, MISBEHAVIOURS)
        ]
        runner.wait(futures[0], timeout=0)  # sends them together
        open_gate()
        together = [runner.wait(future) for future in futures]
    assert batch_of(handed_over, "c0") == names
    assert all(state.is_crashed() or state.is_failed() for state in together)
    assert together == alone


def test_an_unpicklable_call_is_crashed_alone_and_its_batch_goes_on(tmp_path, handed_over):
    with busy_pool(tmp_path) as (runner, open_gate):
        futures = [
            runner.submit(TaskRun(name=f"c{i}"), payloads.return_value, {"value": i})
            for i in range(6)
        ]
        futures.append(
            runner.submit(
                TaskRun(name="locked"), payloads.return_value, {"value": threading.Lock()}
            )
        )
        # Pickled when its batch is sent: now, as somebody waits for it.
        state = runner.wait(futures[-1], timeout=0)
        assert state is not None and state.is_crashed()
        assert state.message.startswith(
            "Task run 'locked' was not started: the arguments (run_kwargs) could not be pickled "
            "to send to a worker process: TypeError: cannot pickle '_thread.lock' object."
        )
        open_gate()
        values = [runner.wait(future).result() for future in futures[:-1]]
    assert values == list(range(6))
    assert batch_of(handed_over, "c0") == [f"c{i}" for i in range(6)]


def test_a_batch_the_worker_cannot_unpickle_is_sent_again_call_by_call(
    tmp_path, monkeypatch, request, handed_over
):
    with busy_pool(tmp_path) as (runner, open_gate):
        # The worker started with the sys.path of then: it cannot import this module.
        (tmp_path / "only_in_parent_too.py").write_text("class Thing:\n    pass\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import only_in_parent_too  # pickled by reference, while it is in sys.modules

        request.addfinalizer(lambda: sys.modules.pop("only_in_parent_too", None))

        futures = [
            runner.submit(TaskRun(name=f"c{i}"), payloads.return_value, {"value": i})
            for i in range(4)
        ]
        futures.append(
            runner.submit(
                TaskRun(name="foreign"), payloads.return_value, {"value": only_in_parent_too.Thing()}
            )
        )
        runner.wait(futures[0], timeout=0)  # the five together
        open_gate()
        states = [runner.wait(future) for future in futures]
    assert batch_of(handed_over, "c0") == ["c0", "c1", "c2", "c3", "foreign"]
    assert [state.result() for state in states[:4]] == [0, 1, 2, 3]
    assert states[4].is_crashed()
    assert "'foreign' could not be unpickled in the worker process" in states[4].message
    assert "only_in_parent_too" in states[4].message
    # Then each went alone: only the call at fault failed.
    assert [["c0"], ["c1"], ["c2"], ["c3"], ["foreign"]] == [
        batch for batch in handed_over if len(batch) == 1 and batch[0] in ("c0", "c1", "c2", "c3", "foreign")
    ]


# -- a worker that dies mid-batch -------------------------------------------------------------


def test_a_worker_killed_mid_batch(tmp_path, handed_over):
    log = str(tmp_path / "starts")
    with busy_pool(tmp_path) as (runner, open_gate):
        futures = submit_recorded(runner, log, 10, then={"c4": "exit"})
        runner.wait(futures[0], timeout=0)  # sends the ten together
        open_gate()
        states = [runner.wait(future) for future in futures]
        after = runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": "after"}))
    assert batch_of(handed_over, "c0") == [f"c{i}" for i in range(10)]
    dying = states[4]
    assert dying.is_crashed()
    pid = dying.message.split("(pid ")[1].split(")")[0]
    assert dying.message == (
        f"The worker process (pid {pid}) running task run 'c4' died unexpectedly: it exited "
        "with code 3. A segfault, the out-of-memory killer or os._exit() in the call can "
        "cause this."
    )
    # Finished before it: their results were lost with the batch; not run again.
    for i in range(4):
        assert states[i].is_crashed()
        assert states[i].message == (
            f"Task run 'c{i}' finished in worker process (pid {pid}), but the worker exited "
            "with code 3 before its result reached this process; the call was not run again."
        )
    # Not started: run on a fresh pool.
    assert [state.result() for state in states[5:]] == [f"c{i}" for i in range(5, 10)]
    assert after.result() == "after"
    assert parallel_payloads.started_calls(log) == sorted(f"c{i}" for i in range(10))


# -- leaving the block ----------------------------------------------------------------------------


def test_leaving_with_an_exception_cancels_gathered_and_sent_calls_not_started(tmp_path):
    log = str(tmp_path / "starts")
    with pytest.raises(KeyError), busy_pool(tmp_path) as (runner, open_gate):
        futures = submit_recorded(runner, log, 30)
        # Ten of them sent as one batch, waiting for room in loky; twenty gathered.
        runner.wait(futures[0], timeout=0)
        assert gathered(runner) == 20
        raise KeyError("stop")
    for future in futures:
        state = runner.wait(future, timeout=0)
        assert state.is_crashed()
        assert state.message == "Execution was cancelled by the runtime environment."
        assert call_of(future).cancelled()
    assert parallel_payloads.started_calls(log) == []


def test_a_finished_batch_keeps_none_of_its_calls_alive():
    import gc
    import weakref

    with ParallelTaskRunner(max_workers=2).start() as runner:
        boxes = [payloads.Box(i) for i in range(200)]
        futures = [
            runner.submit(TaskRun(), payloads.return_value, {"value": box}) for box in boxes
        ]
        states = [runner.wait(future) for future in futures]
        assert [state.result().item for state in states] == list(range(200))
        refs = [weakref.ref(box) for box in boxes]
        del boxes, futures, states
        gc.collect()
        assert [ref() for ref in refs] == [None] * 200


def test_the_standard_suite_runs_on_this_runner_with_auto_and_with_one():
    from tests.support.kinds import all_kinds

    sizes = {
        kind.id: kind.kwargs(None).get("batch_size", "auto")
        for kind in all_kinds()
        if kind.class_name == "ParallelTaskRunner"
    }
    assert sizes == {"parallel": "auto", "parallel-batch1": 1}


def test_completed_states_come_back_in_a_batch_as_they_were():
    # One run_fn for all calls, so that they are one task and may share batches.
    def completed(i):
        return Completed(data=i, message=f"m{i}")

    with ParallelTaskRunner(max_workers=1).start() as runner:
        futures = [runner.submit(TaskRun(), completed, {"i": i}) for i in range(50)]
        states = [runner.wait(future) for future in futures]
    assert states == [Completed(data=i, message=f"m{i}") for i in range(50)]
