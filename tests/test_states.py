"""States, futures' helpers and the collection visitor."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import uuid

import anyio
import cloudpickle
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import PrefectFuture, TaskRun
from taskrunners._collections import iter_leaves, visit_collection
from taskrunners.states import (
    Cancelled,
    Completed,
    Crashed,
    Failed,
    Pending,
    Running,
    State,
    StateType,
    exception_to_crashed_state,
)


def test_names_default_to_the_title_cased_type():
    assert [s().name for s in (Pending, Running, Completed, Failed, Crashed, Cancelled)] == [
        "Pending", "Running", "Completed", "Failed", "Crashed", "Cancelled",
    ]
    assert Pending(name="NotReady").name == "NotReady"
    assert State(StateType.COMPLETED, data=1).is_completed()
    assert State("FAILED").is_failed()


def test_final_states():
    assert [s().is_final() for s in (Pending, Running, Completed, Failed, Crashed)] == [
        False, False, True, True, True,
    ]


def test_result_raises_exceptions_and_returns_base_exceptions_with_a_warning():
    with pytest.raises(ValueError, match="x"):
        Failed(data=ValueError("x")).result()
    error, interrupt = ValueError("x"), KeyboardInterrupt()
    assert Crashed(data=error).result(raise_on_failure=False) is error
    with pytest.warns(RuntimeWarning, match="KeyboardInterrupt"):
        assert Crashed(data=interrupt).result() is interrupt
    assert Completed(data=ValueError("data, not failure")).result().args == ("data, not failure",)


@pytest.mark.parametrize(
    "exc, message",
    [
        (asyncio.CancelledError(), "Execution was cancelled by the runtime environment."),
        (concurrent.futures.CancelledError(), "Execution was cancelled by the runtime environment."),
        (KeyboardInterrupt(), "Execution was aborted by an interrupt signal."),
        (SystemExit(1), "Execution was aborted by Python system exit call."),
        (ValueError(), "Execution was interrupted by an unexpected exception."),
    ],
)
def test_exception_to_crashed_state(exc, message):
    state = exception_to_crashed_state(exc)
    assert state.is_crashed() and state.name == "Crashed"
    assert state.message == message
    assert state.result(raise_on_failure=False) is exc


async def test_the_running_backends_cancellation_is_recognised(anyio_backend):
    caught = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        except anyio.get_cancelled_exc_class() as exc:
            caught.append(exc)
            raise
    assert exception_to_crashed_state(caught[0]).message == (
        "Execution was cancelled by the runtime environment."
    )


def test_states_and_task_runs_pickle():
    state = cloudpickle.loads(cloudpickle.dumps(Failed(data=ValueError("v"), message="m")))
    assert state.is_failed() and state.message == "m" and state.data.args == ("v",)
    run = TaskRun(name="r")
    copy = cloudpickle.loads(cloudpickle.dumps(run))
    assert copy == run and copy.name == "r" and hash(copy) == hash(run)


@pytest.mark.parametrize(
    "state",
    [
        Completed(data={"nested": [1, 2]}),
        Failed(data=ValueError("v"), message="m"),
        Crashed(data=KeyboardInterrupt(), message="Execution was aborted by an interrupt signal."),
        Pending(name="NotReady", message="Upstream task run did not complete."),
        Completed(),
    ],
)
def test_a_state_equals_its_round_trip_and_compares_by_value(state):
    copy = cloudpickle.loads(cloudpickle.dumps(state))
    assert copy is not state
    assert copy == state and hash(copy) == hash(state)
    assert {copy} == {state}


def test_states_differing_in_any_part_are_not_equal():
    base = Failed(data=ValueError("v"), message="m")
    assert base != Failed(data=ValueError("w"), message="m")
    assert base != Failed(data=TypeError("v"), message="m")
    assert base != Failed(data=ValueError("v"), message="other")
    assert base != Crashed(data=ValueError("v"), message="m")
    assert base != Failed(data=ValueError("v"), message="m", name="Other")
    assert Completed(data=1) != Completed(data=2)
    assert Completed(data=1) != 1


def test_data_that_cannot_be_compared_falls_back_to_identity():
    class Ambiguous:
        def __eq__(self, other):
            raise ValueError("The truth value of an array is ambiguous")

        __hash__ = object.__hash__

    value = Ambiguous()
    assert Completed(data=value) == Completed(data=value)
    assert Completed(data=value) != Completed(data=Ambiguous())


def test_task_run_defaults():
    first, second = TaskRun(), TaskRun()
    assert first.id != second.id and first.name != second.name
    assert first.name.startswith("task-run-")


def test_a_task_run_id_is_a_random_uuid_made_once_and_the_same_everywhere():
    runs = [TaskRun() for _ in range(10_000)]
    ids = {run.id for run in runs}
    assert len(ids) == len(runs)
    run = runs[0]
    assert run.id.version == 4 and run.id.variant == uuid.RFC_4122
    assert run.id is run.id and hash(run) == hash(run.id)
    # Read first in another thread, or first after a pickle round trip: the same id.
    fresh = TaskRun()
    seen = []
    reader = threading.Thread(target=lambda: seen.append(fresh.id))
    reader.start()
    reader.join()
    assert seen == [fresh.id]
    unread = TaskRun()
    copy = cloudpickle.loads(cloudpickle.dumps(unread))
    assert copy.id == unread.id and copy == unread
    given = uuid.uuid4()
    assert TaskRun(id=given).id is given and TaskRun(id=given) == TaskRun(name="x", id=given)


def test_a_task_run_id_that_is_not_a_uuid_is_refused():
    with pytest.raises(TypeError, match=r"must be a uuid.UUID, got str 'abc'; leave it out"):
        TaskRun(id="abc")  # type: ignore[arg-type]


@dataclasses.dataclass
class Pair:
    left: object
    right: object


Point = collections.namedtuple("Point", "x y")


def test_visit_collection_walks_every_container_and_reuses_unchanged_ones():
    expr = {"a": [1, (2, {3})], "p": Pair(4, Point(5, 6)), 7: frozenset({8})}
    doubled = visit_collection(expr, lambda v: v * 2 if isinstance(v, int) and not isinstance(v, bool) else v)
    assert doubled == {"a": [2, (4, {6})], "p": Pair(8, Point(10, 12)), 14: frozenset({16})}
    assert type(doubled["p"].right) is Point
    unchanged = visit_collection(expr, lambda v: v)
    assert unchanged is expr
    assert sorted(iter_leaves(expr, lambda v: isinstance(v, int))) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_future_without_runner_handle_pickles_without_its_call():
    future = PrefectFuture(TaskRun(name="p"), task_runner=None, asynchronous=False)
    future._call = concurrent.futures.Future()
    copy = cloudpickle.loads(cloudpickle.dumps(future))
    assert copy.task_run == future.task_run
    # The copy holds no call: it asks its runner for one, and it has none.
    with pytest.raises(TypeError, match="Expected a taskrunners runner, got NoneType"):
        copy.result(timeout=0)


def _completed() -> State:
    return Completed(data=1)


def test_a_future_waits_on_its_own_call_and_one_without_a_call_asks_its_runner():
    held = PrefectFuture(TaskRun(name="held"), task_runner=None, asynchronous=False)
    call = concurrent.futures.Future()
    call.set_result(Completed(data=3))
    held._call = call
    assert held.result() == 3  # no runner needed to wait on the call it holds
    with pytest.raises(TypeError, match="Expected a taskrunners runner, got NoneType"):
        PrefectFuture(TaskRun(), task_runner=None, asynchronous=False).result()
    runner = taskrunners.sync.ConcurrentTaskRunner()
    with runner.start():
        future = runner.submit(TaskRun(), _completed, {})
        assert future.result() == 1
        copy = cloudpickle.loads(cloudpickle.dumps(future))  # with a copy of its runner
        with pytest.raises(RuntimeError, match="cannot be used to wait for work after serialization"):
            copy.wait()
        stranger = PrefectFuture(TaskRun(name="stranger"), runner, asynchronous=False)
        with pytest.raises(RuntimeError, match="No call for task run 'stranger'"):
            stranger.result(timeout=1)
    facade = taskrunners.ConcurrentTaskRunner()
    with pytest.raises(RuntimeError, match="No call for task run 'other'"):
        taskrunners.wait([PrefectFuture(TaskRun(name="other"), facade, asynchronous=True)])
