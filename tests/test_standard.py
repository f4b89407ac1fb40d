"""The standard suite: the contract every runner keeps, blocking twin and facade alike.

Each test runs on every runner kind (``tests/support/kinds_*.py``) in three modes: the
blocking twin, and the async facade on asyncio and on trio.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import re
import threading
import uuid
import warnings

import anyio
import cloudpickle
import pytest

from taskrunners import PrefectFuture, TaskConcurrencyType, TaskRun
from taskrunners._core import seam
from taskrunners.states import Completed, StateType
from tests.support import payloads
from tests.support.kinds import all_kinds, parametrize_kinds

pytestmark = pytest.mark.timeout(180)

CANCELLED = "Execution was cancelled by the runtime environment."
NOT_STARTED = "The task runner must be started before submitting work."
BLOCK_ENDED = (
    "The task runner's start() block has ended: start it again (`with runner.start():`, or "
    "`async with runner.start():` for an async runner of `taskrunners`) before submitting work."
)

# The sequential runner finishes every call inside submit; some tests are about the others.
SEQUENTIAL_KINDS = parametrize_kinds(
    k for k in all_kinds() if k.concurrency_type is TaskConcurrencyType.SEQUENTIAL
)
CONCURRENT_KINDS = parametrize_kinds(
    k for k in all_kinds() if k.concurrency_type is not TaskConcurrencyType.SEQUENTIAL
)


def settings(runner):
    """What the runner was constructed with: its constructor's parameters, read back."""
    return {name: getattr(runner, name) for name in inspect.signature(type(runner)).parameters}


def test_name_str_logger_and_concurrency_type(driver, kind):
    runner = driver.runner
    class_name = kind.class_name
    assert runner.name == class_name.lower().replace("taskrunner", "")
    assert str(runner) == class_name
    assert runner.logger is logging.getLogger(f"task_runner.{runner.name}")
    assert runner.concurrency_type is kind.concurrency_type


def test_start_yields_the_runner_and_refuses_a_second_start(driver):
    with driver.start() as started:
        assert started is driver.runner
        with pytest.raises(RuntimeError, match="The task runner is already started!"):
            with driver.start():
                pass
        assert driver.run(payloads.return_value, {"value": 1}).result() == 1
    # Stopped: submit says the block ended, and that the runner can be started again.
    with pytest.raises(RuntimeError, match=f"^{re.escape(BLOCK_ENDED)}$"):
        driver.submit(payloads.return_value)
    with driver.start():
        assert driver.run(payloads.return_value, {"value": 2}).result() == 2


def test_submit_before_start_is_refused(driver):
    with pytest.raises(RuntimeError, match=f"^{re.escape(NOT_STARTED)}$"):
        driver.submit(payloads.return_value)


def test_a_runner_is_started_by_start_not_by_itself(driver, kind):
    runner, name = driver.runner, kind.class_name

    async def async_with(manager):
        async with manager:
            pass

    if driver.blocking:
        with pytest.raises(TypeError, match=r"use `with runner\.start\(\) as r:`"):
            with runner:
                pass
        blocking = re.escape(
            f"taskrunners.sync.{name} is a blocking runner: use `with runner.start() as r:` "
            f"(no `async`), or in async code the async runner taskrunners.{name} with "
            "`async with runner.start() as r:`."
        )
        for manager in (runner, runner.start()):
            with pytest.raises(TypeError, match=f"^{blocking}$"):
                anyio.run(async_with, manager)
    else:
        with pytest.raises(TypeError, match=r"use `async with runner\.start\(\) as r:`"):
            driver.portal.call(async_with, runner)
        twin = rf"in async code, or the blocking twin taskrunners\.sync\.{name} with "
        for manager in (runner, runner.start()):
            with pytest.raises(TypeError, match=twin):
                with manager:
                    pass
    assert not runner.is_started


@pytest.mark.parametrize(
    "run_fn, run_kwargs, named",
    [
        (42, {}, r"`run_fn` must be callable, got int: 42\. Pass the function itself"),
        (payloads.return_value(1), {}, r"`run_fn` must be callable, got State"),
        (payloads.return_value, [("value", 1)], r"`run_kwargs` must be a mapping .* got list"),
        (payloads.return_value, None, r"`run_kwargs` must be a mapping .* got NoneType: None"),
    ],
)
def test_misuse_at_submit_is_a_type_error_naming_the_argument_and_the_fix(
    driver, run_fn, run_kwargs, named
):
    with driver.start():
        with pytest.raises(TypeError, match=named):
            if driver.blocking:
                driver.runner.submit(TaskRun(), run_fn, run_kwargs)
            else:
                driver.portal.call(driver.runner.submit, TaskRun(), run_fn, run_kwargs)
        assert driver.run(payloads.return_value, {"value": 1}).result() == 1


@pytest.mark.parametrize("run_fn", [payloads.return_value, payloads.async_return_value])
def test_completed_state_carries_the_value(driver, run_fn):
    with driver.start():
        state = driver.run(run_fn, {"value": {"nested": [1, 2]}})
    assert state.is_completed()
    assert state.result() == {"nested": [1, 2]}


def test_failed_state_is_returned_as_is(driver):
    with driver.start():
        state = driver.run(payloads.fail_with, {"value": "nope"})
    assert state.is_failed()
    assert state.message == "it failed"
    with pytest.raises(ValueError, match="nope"):
        state.result()


@pytest.mark.parametrize(
    "exc_kind, message",
    [
        ("ValueError", "Execution was interrupted by an unexpected exception."),
        ("KeyboardInterrupt", "Execution was aborted by an interrupt signal."),
        ("SystemExit", "Execution was aborted by Python system exit call."),
    ],
)
@pytest.mark.parametrize("run_fn", [payloads.raise_exception, payloads.async_raise_exception])
def test_anything_raised_becomes_a_crashed_state(driver, run_fn, exc_kind, message):
    with driver.start():
        state = driver.run(run_fn, {"kind": exc_kind, "message": "raised here"})
    assert state.is_crashed()
    assert state.name == "Crashed"
    assert state.message == message
    exc = state.result(raise_on_failure=False)
    assert type(exc).__name__ == exc_kind
    assert str(exc) == "raised here"


def test_a_value_that_is_not_a_state_gives_a_crashed_state_naming_the_fix(driver):
    with driver.start():
        state = driver.run(payloads.not_a_state, {"value": 3})
    assert state.is_crashed()
    assert state.message == (
        "run_fn 'not_a_state' returned int, not a State; return a State, e.g. `Completed(data=value)`."
    )
    error = state.result(raise_on_failure=False)
    assert type(error) is TypeError and str(error) == "run_fn 'not_a_state' must return a State, got int"


def test_an_unpicklable_result_gives_the_pickling_error_itself(driver, kind):
    try:
        pickle.dumps(threading.Lock())
    except TypeError as exc:
        expected = exc
    with driver.start():
        state = driver.run(payloads.return_unpicklable)
    if not kind.pickles_results:
        # Nothing to pickle in one process: the lock itself comes back.
        assert state.is_completed() and type(state.result()) is type(threading.Lock())
        return
    assert state.is_crashed()
    error = state.result(raise_on_failure=False)
    assert type(error) is type(expected) and str(error) == str(expected), repr(error)


@CONCURRENT_KINDS
def test_wait_with_timeout_gives_none_then_the_state(driver):
    with driver.start():
        future = driver.submit(payloads.sleep_then_return, {"seconds": 2, "value": "late"})
        assert driver.wait(future, timeout=0.01) is None
        state = driver.wait(future)
        assert state.result() == "late"


@SEQUENTIAL_KINDS
def test_sequential_wait_ignores_the_timeout(driver):
    with driver.start():
        future = driver.submit(payloads.sleep_then_return, {"seconds": 0.2, "value": "done"})
        assert driver.wait(future, timeout=0).result() == "done"


def test_leaving_the_block_waits_for_all_submitted_work(driver):
    with driver.start():
        futures = [
            driver.submit(payloads.sleep_then_return, {"seconds": 0.3, "value": i}) for i in range(4)
        ]
    # Already final: a zero timeout is enough.
    states = [driver.wait(future, timeout=0) for future in futures]
    assert [state.result() for state in states] == [0, 1, 2, 3]


def test_leaving_the_block_with_an_exception_reraises_it_unchanged(driver):
    error = LookupError("from the body")
    with pytest.raises(LookupError) as info:
        with driver.start():
            driver.submit(payloads.return_value, {"value": 1})
            raise error
    assert info.value is error
    assert not driver.runner.is_started
    with driver.start():
        assert driver.run(payloads.return_value, {"value": 5}).result() == 5


@CONCURRENT_KINDS
def test_leaving_the_block_with_an_exception_does_not_wait_for_long_calls(driver, kind):
    # The test's timeout fails it if the runner waits for the 60 s calls.
    with pytest.raises(KeyError):
        with driver.start():
            futures = [
                driver.submit(payloads.async_sleep_then_return, {"seconds": 60}),
                driver.submit(payloads.sleep_then_return, {"seconds": 0.5}),
            ]
            raise KeyError("stop")
    state = driver.wait(futures[0], timeout=30)
    assert state.is_crashed()
    if kind.class_name == "ParallelTaskRunner" and state.message != CANCELLED:
        # A race: the call may have reached a worker before the block was left; it was
        # then stopped with the workers. Usually it is still queued, and cancelled.
        assert re.fullmatch(
            r"Task run '.+' was stopped in worker process \(pid \d+\): the runner's start\(\) "
            r"block was left with KeyError\('stop'\), which terminates the worker processes\.",
            state.message,
        ), state.message
    else:
        assert state.message == CANCELLED


def test_upstream_futures_anywhere_in_the_arguments_arrive_as_states(driver):
    with driver.start():
        up = [driver.submit(payloads.return_value, {"value": i}) for i in range(5)]
        nested = {
            "list": [up[0]],
            "tuple": (up[1],),
            "set": {up[2]},
            "dict": {"key": up[3]},
            "dataclass": payloads.Box(item=up[4]),
        }
        state = driver.run(payloads.receive_states, {"states": nested})
    received = state.result()
    assert received["list"][0].result() == 0
    assert received["tuple"][0].result() == 1
    assert next(iter(received["set"])).result() == 2
    assert received["dict"]["key"].result() == 3
    assert type(received["dataclass"]) is payloads.Box and received["dataclass"].item.result() == 4
    for found in (received["list"][0], received["dataclass"].item):
        assert found.type is StateType.COMPLETED


# Concurrent shares memory with its threads, as every thread pool does.
SNAPSHOT_KINDS = parametrize_kinds(k for k in all_kinds() if k.class_name != "ConcurrentTaskRunner")


@SNAPSHOT_KINDS
def test_a_call_sees_its_arguments_as_they_were_at_submit(driver, kind):
    """Also when it waits behind busy workers, in a batch or the engine's queue."""
    with driver.start():
        if kind.concurrency_type is not TaskConcurrencyType.SEQUENTIAL:
            for _ in range(4):
                driver.submit(payloads.sleep_then_return, {"seconds": 0.5})
        up = driver.submit(payloads.return_value, {"value": "up"})
        flat, nested, raw, box = [0], {"n": [0]}, bytearray(1), payloads.Box(item=[0])
        futures = []
        for i in range(20):
            flat[0] = nested["n"][0] = raw[0] = box.item[0] = i
            arguments = {"flat": flat, "nested": nested, "raw": raw, "box": box}
            futures.append(
                driver.submit(payloads.read_snapshot, {**arguments, "with_future": [flat, up]})
            )
        flat[0] = nested["n"][0] = raw[0] = box.item[0] = 99
        seen = [driver.wait(future).result() for future in futures]
    assert seen == [(i, i, i, i, i, "up") for i in range(20)]


@CONCURRENT_KINDS
def test_a_call_cancelled_before_it_starts_hands_its_downstream_the_cancelled_state(kind, request):
    runner = kind.make(request, blocking=True)
    with runner.start():
        slow = runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 2})
        # Waiting for ``slow``, ``up`` has not started, so it can be cancelled.
        up = runner.submit(TaskRun(), payloads.receive_states, {"states": [slow]})
        assert seam.call_of(up).cancel()
        down = runner.submit(TaskRun(), payloads.receive_states, {"states": [up]})
        state = runner.wait(down, timeout=60)
    (received,) = state.result()
    assert received.is_crashed() and received.message == CANCELLED


def test_a_chain_of_dependent_calls_completes(driver):
    with driver.start():
        future = driver.submit(payloads.return_value, {"value": 0})
        for _ in range(20):
            future = driver.submit(payloads.add_upstream, {"upstream": future, "y": 1})
        assert driver.wait(future).result() == 20


def test_a_thousand_calls_none_lost(driver):
    with driver.start():
        futures = [driver.submit(payloads.return_value, {"value": i}) for i in range(1000)]
        values = [driver.wait(future).result() for future in futures]
    assert values == list(range(1000))


def test_concurrency_canary(driver, kind, tmp_path):
    """Two calls that each wait for the other's marker overlap on every runner but Sequential."""
    sequential = kind.concurrency_type is TaskConcurrencyType.SEQUENTIAL
    patience = 1.0 if sequential else 60.0
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with driver.start():
        first = driver.submit(payloads.meet, {"own_marker": a, "other_marker": b, "patience": patience})
        second = driver.submit(payloads.meet, {"own_marker": b, "other_marker": a, "patience": patience})
        overlapped = [driver.wait(first).result(), driver.wait(second).result()]
    assert overlapped == ([False, True] if sequential else [True, True])


def test_futures_know_their_run_and_block_or_await_by_mode(driver):
    task_run = TaskRun(name="named-run")
    with driver.start():
        future = driver.submit(payloads.return_value, {"value": 7}, task_run=task_run)
        assert isinstance(future, PrefectFuture)
        assert future.task_run is task_run and future.run_id == task_run.id
        assert future.task_runner is driver.runner
        assert future.asynchronous is not driver.blocking
        assert repr(future) == "PrefectFuture('named-run')"
        assert hash(future) == hash(task_run.id)
        with pytest.warns(UserWarning, match="cast to a boolean"):
            assert bool(future)
        if driver.blocking:
            assert future.wait().result() == 7
            assert future.result() == 7
        else:
            assert driver.portal.call(future.wait).result() == 7
            assert driver.portal.call(future.result) == 7


def test_waiting_for_a_future_the_runner_never_saw_is_refused(driver):
    stranger = PrefectFuture(TaskRun(id=uuid.uuid4()), driver.runner, asynchronous=not driver.blocking)
    with driver.start():
        with pytest.raises(RuntimeError, match="wait for the future that submit"):
            driver.wait(stranger)


def test_a_started_runner_survives_a_pickle_round_trip(driver, kind):
    with driver.start():
        driver.wait(driver.submit(payloads.return_value, {"value": 1}))
        copy = cloudpickle.loads(cloudpickle.dumps(driver.runner))
        assert type(copy) is type(driver.runner)
        assert settings(copy) == settings(driver.runner)
        assert copy.name == driver.runner.name
        assert copy.concurrency_type is driver.runner.concurrency_type
        # Only the Sequential runner holds no handle the copy lost. (What the others'
        # copies say, and where a Dask copy reconnects: each runner's own tests.)
        copied = driver.for_runner(copy)
        if kind.concurrency_type is TaskConcurrencyType.SEQUENTIAL:
            assert copied.run(payloads.return_value, {"value": 2}).result() == 2
        else:
            with pytest.raises(RuntimeError, match="after serialization"):
                copied.submit(payloads.return_value, {"value": 2})


def test_submission_from_four_threads(kind, request):
    """The blocking twin is safe to call from several threads at once."""
    runner = kind.make(request, blocking=True)
    results = {}

    def submit_many(worker: int) -> None:
        futures = [
            runner.submit(TaskRun(), payloads.return_value, {"value": (worker, i)}) for i in range(50)
        ]
        results[worker] = [runner.wait(future).result() for future in futures]

    with runner.start():
        threads = [threading.Thread(target=submit_many, args=(worker,)) for worker in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {worker: [(worker, i) for i in range(50)] for worker in range(4)}


def test_no_warnings_from_a_plain_run(driver):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with driver.start():
            inner = driver.run(payloads.return_value, {"value": Completed(data=1)}).result()
    assert inner.is_completed() and inner.result() == 1
