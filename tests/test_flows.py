"""Flows and tasks on every runner.

The seed-era standard flow tests (a successful run, a failing run, the concurrency
canaries, subflows), then retries, map, wait/as_completed, the greetings example and
the engine's own rules. The runners are the standard suite's kinds (tests/support/kinds_*.py).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import pathlib
import re
import sys
import threading
import time
from typing import Any, Callable

import anyio
import cloudpickle
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import (
    ConcurrentTaskRunner,
    PrefectFuture,
    SequentialTaskRunner,
    TaskConcurrencyType,
    TaskRun,
    as_completed,
    flow,
    task,
    unmapped,
    wait,
)
from taskrunners._core import seam
from taskrunners.states import Completed, Failed
from tests.support import ROOT, payloads
from tests.support.kinds import RunnerKind, all_kinds
from tests.support.processes import run_python
from tests.support.waiting import async_holds_within, holds_within, wait_for_path

pytestmark = pytest.mark.timeout(180)

BLOCK_ENDED = (
    "The task runner's start() block has ended: start it again (`with runner.start():`, or "
    "`async with runner.start():` for an async runner of `taskrunners`) before submitting work."
)

# Tasks and helpers defined here travel by value, so workers need not import the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _kind(kind_id: str) -> RunnerKind:
    return next(kind for kind in all_kinds() if kind.id == kind_id)


# One kind per backend: Ray's id names the head it runs against, when it has one.
_RAY = next(kind for kind in all_kinds() if kind.class_name == "RayTaskRunner")


@dataclasses.dataclass(frozen=True)
class FlowRunner:
    """A runner class the flow tests run on, as two standard kinds of it."""

    # Most tests' runners: Dask's and Ray's join the cluster the session shares, as
    # starting one per flow costs seconds.
    shared: RunnerKind
    # The seed's successful-run example: a runner that starts its own pool or cluster
    # (Ray's joins the session's too: a process holds one Ray connection).
    own: RunnerKind

    @property
    def id(self) -> str:
        """The runner's name, as examples/greetings.py takes it: "dask", "ray", ..."""
        return self.shared.class_name[: -len("TaskRunner")].lower()


RUNNERS = [
    FlowRunner(_kind("sequential"), _kind("sequential")),
    FlowRunner(_kind("concurrent"), _kind("concurrent")),
    FlowRunner(_kind("parallel"), _kind("parallel")),
    FlowRunner(_kind("dask-external"), _kind("dask-processes")),
    FlowRunner(_RAY, _RAY),
]


class Runner:
    """A :class:`FlowRunner` in one test: makes fresh, unstarted facade instances."""

    def __init__(self, spec: FlowRunner, request: pytest.FixtureRequest) -> None:
        self.spec = spec
        self.id = spec.id
        self.sequential = spec.shared.concurrency_type is TaskConcurrencyType.SEQUENTIAL
        self.in_process = spec.shared.in_process
        self._request = request

    def make(self) -> Any:
        """A runner on the shared cluster, if the kind has one."""
        return self._made(self.spec.shared)

    def make_own(self) -> Any:
        """A runner that starts its own pool or cluster (Ray: joins the process's connection)."""
        return self._made(self.spec.own)

    def _made(self, kind: RunnerKind) -> Any:
        runner = kind.make(self._request, blocking=False)
        if kind is _RAY:
            import ray.cloudpickle  # Ray pickles with its own copy of cloudpickle

            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        return runner


# Trio adds little for the cluster runners, which the facade reaches through threads.
ASYNC_CASES = [
    pytest.param(runner, backend, id=f"{runner.id}-{backend}", marks=runner.shared.marks)
    for runner in RUNNERS
    for backend in ("asyncio", "trio")
    if backend == "asyncio" or runner.id not in ("dask", "ray")
]
IN_PROCESS = [runner for runner in RUNNERS if runner.shared.in_process]


@pytest.fixture(params=[pytest.param(r, id=r.id, marks=r.shared.marks) for r in RUNNERS])
def runner(request: pytest.FixtureRequest) -> Runner:
    return Runner(request.param, request)


def async_cases() -> Any:
    return pytest.mark.parametrize("runner, backend", ASYNC_CASES, indirect=["runner"])


def in_process_runners() -> Any:
    return pytest.mark.parametrize(
        "runner", [pytest.param(r, id=r.id) for r in IN_PROCESS], indirect=True
    )


def holds(path: pathlib.Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and path.read_text() == text


# -- the seed-era standard flow tests ----------------------------------------------------


def test_successful_flow_run(runner):
    @task
    def task_a():
        return "a"

    @task
    def task_b():
        return "b"

    @task
    def task_c(b):
        return b + "c"

    # The seed's example: the runner starts (and stops) its own pool or cluster.
    @flow(task_runner=runner.make_own())
    def test_flow():
        a = task_a()
        b = task_b()
        c = task_c(b)
        return a, b, c

    state = test_flow()
    assert state.is_completed()
    a, b, c = state.result()
    assert (a.result(), b.result(), c.result()) == ("a", "b", "bc")


@async_cases()
def test_successful_async_flow_run(runner, backend):
    @task
    async def task_a():
        return "a"

    @task
    def task_b():
        return "b"

    @task
    async def task_c(b):
        return b + "c"

    @flow(task_runner=runner.make())
    async def test_flow():
        a = await task_a()
        b = task_b()
        assert isinstance(b, PrefectFuture)
        c = await task_c(b)
        return a, b, c

    state = anyio.run(test_flow, backend=backend)
    assert state.is_completed()
    assert [s.result() for s in state.result()] == ["a", "b", "bc"]


def test_failing_flow_run(runner, tmp_path):
    ran_downstream = tmp_path / "downstream-ran"

    @task
    def task_a():
        raise RuntimeError("This task fails!")

    @task
    def task_b():
        raise ValueError("This task fails and passes data downstream!")

    @task
    def task_c(b):
        ran_downstream.touch()
        return b + "c"

    futures = {}

    @flow(task_runner=runner.make())
    def test_flow():
        futures["a"] = a = task_a()
        futures["b"] = b = task_b()
        futures["c"] = c = task_c(b)
        futures["d"] = d = task_c(c)
        return a, b, c, d

    state = test_flow()
    assert state.is_failed()
    a, b, c, d = state.result(raise_on_failure=False)
    with pytest.raises(RuntimeError, match="This task fails!"):
        a.result()
    with pytest.raises(ValueError, match="This task fails and passes data downstream"):
        b.result()
    for downstream, upstream in ((c, "b"), (d, "c")):
        assert downstream.is_pending()
        assert downstream.name == "NotReady"
        assert downstream.message == (
            f"Upstream task run '{futures[upstream].run_id}' did not reach a 'COMPLETED' state."
        )
    assert not ran_downstream.exists()


def test_a_task_that_returns_a_state_ends_in_that_state(runner, tmp_path):
    ran_downstream = tmp_path / "downstream-ran"

    @task
    def refuse():
        return Failed(message="refused on purpose")

    @task
    def hand_over():
        return Completed(data=20)

    @task
    def add_one(x):
        ran_downstream.touch()
        return x + 1

    futures = {}

    @flow(task_runner=runner.make())
    def test_flow():
        futures["refused"] = refused = refuse()
        futures["blocked"] = blocked = add_one(refused)
        handed = hand_over()
        return refused, blocked, handed, add_one(handed)

    state = test_flow()
    assert state.is_failed()
    refused, blocked, handed, added = state.result(raise_on_failure=False)
    assert refused.is_failed() and refused.message == "refused on purpose"
    assert blocked.is_pending() and blocked.name == "NotReady"
    assert blocked.message == (
        f"Upstream task run '{futures['refused'].run_id}' did not reach a 'COMPLETED' state."
    )
    assert handed == Completed(data=20)
    assert added.result() == 21
    assert ran_downstream.exists()  # only the run downstream of the Completed state


@async_cases()
def test_an_async_task_that_returns_a_state_ends_in_that_state(runner, backend):
    @task
    async def refuse():
        return Failed(message="refused on purpose")

    @task
    async def hand_over():
        return Completed(data=20)

    @task
    async def add_one(x):
        return x + 1

    @flow(task_runner=runner.make())
    async def test_flow():
        refused = await refuse()
        return refused, await add_one(refused), await add_one(await hand_over())

    state = anyio.run(test_flow, backend=backend)
    assert state.is_failed()
    refused, blocked, added = state.result(raise_on_failure=False)
    assert refused.is_failed() and refused.message == "refused on purpose"
    assert blocked.name == "NotReady"
    assert added.result() == 21


def test_a_returned_failed_state_is_retried_like_a_raise(tmp_path):
    attempts = tmp_path / "attempts"

    @task(retries=2)
    def flaky():
        with attempts.open("a") as file:
            file.write("x")
        if len(attempts.read_text()) < 3:
            return Failed(message="not yet")
        return Completed(data="third time")

    @task(retries=1)
    def hopeless():
        return Failed(message="never")

    @flow(task_runner=SequentialTaskRunner())
    def test_flow():
        return flaky(), hopeless()

    ok, failed = test_flow().result(raise_on_failure=False)
    assert ok.result() == "third time" and attempts.read_text() == "xxx"
    assert failed == Failed(message="never")


@async_cases()
def test_failing_async_flow_run(runner, backend):
    @task
    async def task_b():
        raise ValueError("async failure")

    @task
    async def task_c(b):
        return b + "c"

    futures = {}

    @flow(task_runner=runner.make())
    async def test_flow():
        futures["b"] = b = await task_b()
        return b, await task_c(b)

    state = anyio.run(test_flow, backend=backend)
    assert state.is_failed()
    b, c = state.result(raise_on_failure=False)
    with pytest.raises(ValueError, match="async failure"):
        b.result()
    assert c.name == "NotReady"
    assert c.message == f"Upstream task run '{futures['b'].run_id}' did not reach a 'COMPLETED' state."


def _sync_canary_tasks(path: pathlib.Path, patience: float):
    """``foo`` sleeps until ``bar`` wrote (at most ``patience`` s), then writes "foo"."""

    @task
    def foo():
        holds_within(holds(path, "bar"), patience)
        path.write_text("foo")

    @task
    def bar():
        path.write_text("bar")

    return foo, bar


def _async_canary_tasks(path: pathlib.Path, patience: float):
    @task
    async def foo():
        await async_holds_within(holds(path, "bar"), patience)
        path.write_text("foo")

    @task
    async def bar():
        path.write_text("bar")

    return foo, bar


def test_sync_tasks_run_in_order_only_on_the_sequential_runner(runner, tmp_path):
    path = tmp_path / "canary"
    foo, bar = _sync_canary_tasks(path, patience=1.0 if runner.sequential else 60.0)

    @flow(task_runner=runner.make())
    def test_flow():
        foo()
        bar()

    assert test_flow().is_completed()
    assert path.read_text() == ("bar" if runner.sequential else "foo")


@async_cases()
def test_async_tasks_run_in_order_only_on_the_sequential_runner(runner, backend, tmp_path):
    path = tmp_path / "canary"
    foo, bar = _async_canary_tasks(path, patience=1.0 if runner.sequential else 60.0)

    @flow(task_runner=runner.make())
    async def test_flow():
        await foo()
        await bar()

    assert anyio.run(test_flow, backend=backend).is_completed()
    assert path.read_text() == ("bar" if runner.sequential else "foo")


@async_cases()
def test_async_tasks_in_a_task_group_interleave_on_every_runner(runner, backend, tmp_path):
    path = tmp_path / "canary"
    foo, bar = _async_canary_tasks(path, patience=60.0)

    @flow(task_runner=runner.make())
    async def test_flow():
        async with anyio.create_task_group() as tg:
            tg.start_soon(foo)
            tg.start_soon(bar)

    assert anyio.run(test_flow, backend=backend).is_completed()
    assert path.read_text() == "foo"


def test_sync_subflows_run_sequentially(runner, tmp_path):
    path = tmp_path / "canary"
    # If the subflow returned before foo finished, foo would see bar and write last.
    foo, bar = _sync_canary_tasks(path, patience=1.0)
    task_runner = runner.make()

    @flow(task_runner=task_runner)
    def in_subflow():
        foo()

    @flow(task_runner=task_runner)
    def test_flow():
        sub_state = in_subflow()
        bar()
        return sub_state

    state = test_flow()
    assert state.is_completed() and state.result().is_completed()
    assert path.read_text() == "bar"


@async_cases()
def test_async_subflows_run_sequentially(runner, backend, tmp_path):
    path = tmp_path / "canary"
    foo, bar = _async_canary_tasks(path, patience=1.0)
    task_runner = runner.make()

    @flow(task_runner=task_runner)
    async def in_subflow():
        await foo()

    @flow(task_runner=task_runner)
    async def test_flow():
        await in_subflow()
        await bar()

    assert anyio.run(test_flow, backend=backend).is_completed()
    assert path.read_text() == "bar"


# -- retries -------------------------------------------------------------------------------


def _count_attempt(directory: str) -> int:
    number = len(os.listdir(directory)) + 1
    (pathlib.Path(directory) / f"attempt-{number}").touch()
    return number


def test_retries_with_a_list_of_delays(runner, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="taskrunners.task")
    flaky_dir, hopeless_dir = tmp_path / "flaky", tmp_path / "hopeless"
    flaky_dir.mkdir()
    hopeless_dir.mkdir()

    @task(retries=3, retry_delay_seconds=[0.05, 0.1])
    def flaky(directory):
        number = _count_attempt(directory)
        if number < 4:
            raise ValueError(f"attempt {number} fails")
        return number

    @task(retries=1, retry_delay_seconds=0)
    def hopeless(directory):
        raise KeyError(f"attempt {_count_attempt(directory)} fails")

    @flow(task_runner=runner.make())
    def test_flow():
        return flaky(str(flaky_dir)), hopeless(str(hopeless_dir))

    flaky_state, hopeless_state = test_flow().result(raise_on_failure=False)
    assert flaky_state.result() == 4
    assert len(os.listdir(flaky_dir)) == 4
    assert hopeless_state.is_failed()
    with pytest.raises(KeyError, match="attempt 2 fails"):
        hopeless_state.result()
    assert len(os.listdir(hopeless_dir)) == 2
    if runner.in_process:  # worker processes log where they run
        records = [r for r in caplog.records if getattr(r, "task_run_name", None) == "flaky-0"]
        started = [r.attempt for r in records if r.levelno == logging.DEBUG]
        retried = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert started == [1, 2, 3, 4]
        assert retried == [
            f"Task run 'flaky-0': attempt {n} of 4 raised ValueError: attempt {n} fails; "
            f"retrying in {delay} s."
            for n, delay in ((1, 0.05), (2, 0.1), (3, 0.1))
        ]


@async_cases()
def test_async_retries(runner, backend, tmp_path):
    @task(retries=2, retry_delay_seconds=[0.01])
    async def flaky(directory):
        await anyio.sleep(0)
        number = _count_attempt(directory)
        if number < 3:
            raise ValueError(f"attempt {number} fails")
        return number

    @flow(task_runner=runner.make())
    async def test_flow():
        return await flaky(str(tmp_path))

    assert anyio.run(test_flow, backend=backend).result().result() == 3


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"retries": -1}, "`retries` must be an integer >= 0"),
        ({"retries": 1.5}, "`retries` must be an integer >= 0"),
        ({"retry_delay_seconds": -1}, "`retry_delay_seconds` must be a number"),
        ({"retry_delay_seconds": []}, "non-empty list"),
        ({"retry_delay_seconds": "1"}, "got '1'"),
    ],
)
def test_bad_retry_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task(**settings)(lambda: None)


@task
def hang(pid_path: str, release_path: str) -> None:
    """Runs for an hour, unless ``release_path`` appears (the test's in-process threads),
    counting its turns in ``pid_path`` after its pid."""
    deadline = time.monotonic() + 3600
    turns = 0
    while time.monotonic() < deadline and not os.path.exists(release_path):
        pathlib.Path(pid_path + ".tmp").write_text(f"{os.getpid()} {turns}")
        os.replace(pid_path + ".tmp", pid_path)
        turns += 1
        time.sleep(0.05)


def _stopped(path: pathlib.Path) -> bool:
    before = path.read_text()
    time.sleep(0.5)
    return path.read_text() == before


# Sequential runs a call inside submit: a body cannot give up on it.
CONCURRENT_RUNNERS = [
    pytest.param(r, id=r.id, marks=r.shared.marks) for r in RUNNERS if r.id != "sequential"
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavour", ["sync", "asyncio", "trio"])
@pytest.mark.parametrize("runner", CONCURRENT_RUNNERS, indirect=True)
def test_a_flow_whose_body_raises_stops_its_hung_calls_and_returns_failed(runner, flavour, tmp_path):
    import psutil

    pid_path, release = tmp_path / "pid", tmp_path / "release"
    if flavour == "sync":

        @flow(task_runner=runner.make_own())
        def give_up():
            future = hang(str(pid_path), str(release))
            wait_for_path(pid_path)
            if future.wait(1) is None:
                raise TimeoutError("gave up on the hung call")

        started = time.monotonic()
        state = give_up()
    else:

        @flow(task_runner=runner.make_own())
        async def give_up():
            future = hang(str(pid_path), str(release))
            await anyio.to_thread.run_sync(wait_for_path, pid_path)
            if await future.wait(1) is None:
                raise TimeoutError("gave up on the hung call")

        started = time.monotonic()
        state = anyio.run(give_up, backend=flavour)
    try:
        assert time.monotonic() - started < 60
        assert state.is_failed()
        assert isinstance(state.result(raise_on_failure=False), TimeoutError)
        if not runner.in_process:  # the hung call is stopped (threads are left running)
            assert holds_within(lambda: _stopped(pid_path), 30)
        if runner.id in ("parallel", "dask"):  # with the worker processes the runner owns
            pid = int(pid_path.read_text().split()[0])
            assert holds_within(lambda: not psutil.pid_exists(pid), 30)
    finally:
        release.write_text("")


# Concurrent shares memory with its threads, as every thread pool does.
SNAPSHOT_RUNNERS = [pytest.param(r, id=r.id, marks=r.shared.marks) for r in RUNNERS if r.id != "concurrent"]


@pytest.mark.parametrize("runner", SNAPSHOT_RUNNERS, indirect=True)
def test_a_task_run_sees_its_arguments_as_they_were_when_called(runner):
    @task
    def busy():
        time.sleep(0.5)

    @task
    def read(values, table):
        return values[0], table["n"][0]

    @flow(task_runner=runner.make())
    def test_flow():
        if not runner.sequential:
            for _ in range(4):
                busy()
        values, table = [0], {"n": [0]}
        called = []
        for i in range(12):
            values[0] = table["n"][0] = i
            called.append(read(values, table=table))
        mapped = read.map([values, values], table=unmapped(table))
        values[0] = table["n"][0] = 99
        return [future.result() for future in called + mapped]

    assert test_flow().result() == [(i, i) for i in range(12)] + [(11, 11)] * 2


# -- map and unmapped ---------------------------------------------------------------------------


def test_map_with_unmapped(runner):
    @task
    def add(x, y):
        return x + y

    @flow(task_runner=runner.make())
    def test_flow():
        base = add(1, 1)
        return (
            add.map([1, 2, 3], unmapped(10)),
            add.map(x=[base, 5], y=unmapped(base)),
            add.map((1, 2), [10, 20]),
        )

    constant, upstream, zipped = test_flow().result()
    assert [s.result() for s in constant] == [11, 12, 13]
    assert [s.result() for s in upstream] == [4, 7]
    assert [s.result() for s in zipped] == [11, 22]


@async_cases()
def test_async_map(runner, backend):
    @task
    async def add(x, y):
        return x + y

    @flow(task_runner=runner.make())
    async def test_flow():
        futures = await add.map(range(4), y=unmapped(100))
        return [await future.result() for future in futures]

    assert anyio.run(test_flow, backend=backend).result() == [100, 101, 102, 103]


def test_map_refuses_what_it_cannot_map():
    @task
    def add(x, y):
        return x + y

    @flow(task_runner=SequentialTaskRunner())
    def test_flow(case):
        if case == "lengths":
            add.map([1, 2], [1, 2, 3])
        elif case == "scalar":
            add.map([1, 2], 5)
        elif case == "none":
            add.map(unmapped(1), unmapped(2))
        else:
            add.map(add(1, 2), unmapped(1))

    for case, error, message in [
        ("lengths", ValueError, "positional argument 0 has 2, positional argument 1 has 3"),
        ("scalar", TypeError, "int is not iterable; wrap a constant argument in unmapped"),
        ("none", ValueError, "needs at least one iterable argument"),
        ("future", TypeError, "cannot map over positional argument 0, a PrefectFuture"),
    ]:
        state = test_flow(case)
        assert state.is_failed()
        with pytest.raises(error, match=re.escape(message)):
            state.result()


def test_map_outside_a_flow_calls_the_function_per_element():
    @task
    def add(x, y):
        return x + y

    @task
    async def async_add(x, y):
        return x + y

    assert add.map([1, 2], unmapped(1)) == [2, 3]
    assert anyio.run(async_add.map, [1, 2], [3, 4]) == [4, 6]


# -- wait and as_completed ----------------------------------------------------------------------


def test_wait_and_as_completed_in_a_sync_flow(runner, tmp_path):
    release = tmp_path / "release"
    never = tmp_path / "never"
    if runner.sequential:  # its runs finish inside submit: let them through at once
        release.touch()
        never.touch()

    @task
    def held(path, value):
        wait_for_path(path)
        return value

    @task
    def quick(value):
        return value

    @flow(task_runner=runner.make())
    def test_flow():
        slow, fast = held(str(release), "slow"), quick("fast")
        if runner.sequential:
            assert [f.result() for f in as_completed([slow, fast, slow])] == ["slow", "fast"]
            assert wait([slow, fast], timeout=0) == ({slow, fast}, set())
            return
        first = next(iter(as_completed([slow, fast], timeout=60)))
        assert first is fast
        done, not_done = wait([slow, fast], timeout=0.1)
        assert (done, not_done) == ({fast}, {slow})
        release.touch()
        assert wait([slow, fast]) == ({slow, fast}, set())
        stuck = held(str(never), "stuck")
        seen = []
        with pytest.raises(TimeoutError, match=r"1 \(of 2\) futures unfinished"):
            for future in as_completed([fast, stuck], timeout=0.2):
                seen.append(future)
        assert seen == [fast]
        never.touch()

    state = test_flow()
    assert state.is_completed(), state


@async_cases()
def test_wait_and_as_completed_in_an_async_flow(runner, backend, tmp_path):
    release = tmp_path / "release"
    if runner.sequential:
        release.touch()

    @task
    async def held(path, value):
        assert await async_holds_within(pathlib.Path(path).exists, 60), "never released"
        return value

    @task
    async def quick(value):
        return value

    @flow(task_runner=runner.make())
    async def test_flow():
        slow, fast = await held(str(release), "slow"), await quick("fast")
        if not runner.sequential:
            async for first in as_completed([slow, fast], timeout=60):  # noqa: B007
                break
            assert first is fast
            assert await wait([slow, fast], timeout=0.1) == ({fast}, {slow})
            with pytest.raises(TimeoutError):
                async for _ in as_completed([slow], timeout=0.1):
                    pass
            release.touch()
        assert await wait([slow, fast]) == ({slow, fast}, set())
        assert await wait([]) == (set(), set())
        with pytest.raises(RuntimeError, match="use `async for future in as_completed"):
            for _ in as_completed([slow]):
                pass
        return sorted([await f.result() async for f in as_completed([slow, fast])])

    assert anyio.run(test_flow, backend=backend).result() == ["fast", "slow"]


def test_wait_and_as_completed_take_futures_from_several_runners():
    with taskrunners.sync.SequentialTaskRunner().start() as sequential, \
            taskrunners.sync.ConcurrentTaskRunner().start() as concurrent:
        first = sequential.submit(TaskRun(), payloads.return_value, {"value": 1})
        second = concurrent.submit(
            TaskRun(), payloads.sleep_then_return, {"seconds": 0.1, "value": 2}
        )
        assert wait([first, second], timeout=30) == ({first, second}, set())
        assert sorted(f.result() for f in as_completed([first, second])) == [1, 2]
    with pytest.raises(TypeError, match="Expected a PrefectFuture"):
        wait([first, "not a future"])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_wait_and_as_completed_take_futures_from_several_runners(backend):
    async def main():
        async with SequentialTaskRunner().start() as sequential, \
                ConcurrentTaskRunner().start() as concurrent:
            first = await sequential.submit(TaskRun(), payloads.async_return_value, {"value": 1})
            second = await concurrent.submit(
                TaskRun(), payloads.async_sleep_then_return, {"seconds": 0.1, "value": 2}
            )
            third = await concurrent.submit(
                TaskRun(), payloads.sleep_then_return, {"seconds": 0.1, "value": 3}
            )
            done, not_done = await wait([first, second, third], timeout=30)
            assert (done, not_done) == ({first, second, third}, set())
            return sorted([await f.result() async for f in as_completed([first, second, third])])

    assert anyio.run(main, backend=backend) == [1, 2, 3]


# -- the greetings example ------------------------------------------------------------------------

NAMES = ["arthur", "trillian", "ford", "marvin"]
GREETINGS = [f"{word} {name}" for name in NAMES for word in ("hello", "goodbye")]


@pytest.mark.timeout(300)
def test_the_greetings_example_runs_as_a_script(runner):
    result = run_python(ROOT / "examples" / "greetings.py", runner.id, timeout=240)
    assert result.returncode == 0, result.stderr
    if runner.sequential:
        assert result.stdout.splitlines() == GREETINGS
    elif runner.id != "ray":  # Ray forwards worker output on its own schedule
        # Threads and processes may tear one print's text from its newline.
        found = re.findall(r"(?:hello|goodbye) (?:arthur|trillian|ford|marvin)", result.stdout)
        assert sorted(found) == sorted(GREETINGS)


def test_the_greetings_example_refuses_an_unknown_runner():
    result = run_python(ROOT / "examples" / "greetings.py", "threads", timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'threads'" in result.stderr


# -- the engine's rules ---------------------------------------------------------------------------


@task
def identity(value):
    return value


@dataclasses.dataclass
class Pair:
    left: Any
    right: Any


def test_futures_and_states_nested_in_arguments_arrive_as_data(runner):
    @flow(task_runner=runner.make())
    def test_flow():
        one = identity(1)
        nested = {
            "list": [one],
            "tuple": (one, Completed(data=2)),
            "set": {one},
            "dict": {"key": one},
            "pair": Pair(one, Completed(data="two")),
        }
        return identity(nested)

    received = test_flow().result().result()
    assert received["list"] == [1]
    assert received["tuple"] == (1, 2)
    assert received["set"] == {1}
    assert received["dict"] == {"key": 1}
    assert (received["pair"].left, received["pair"].right) == (1, "two")


def test_a_failed_state_argument_makes_the_run_not_ready(runner):
    @flow(task_runner=runner.make())
    def test_flow():
        return identity([Failed(data=ValueError("x"))])

    state = test_flow().result(raise_on_failure=False)
    assert state.name == "NotReady"
    assert state.message == "Upstream state Failed(data=ValueError('x')) did not reach a 'COMPLETED' state."


def test_a_task_called_inside_a_task_is_a_plain_call(runner):
    @task
    def inner(x):
        return x + 1

    @task
    def outer(x):
        value = inner(x)
        assert not isinstance(value, PrefectFuture)
        return value * 10

    @flow(task_runner=runner.make())
    def test_flow():
        return outer(1)

    assert test_flow().result().result() == 20


def test_a_raising_flow_body_fails_the_flow_without_waiting_and_cancels_what_has_not_started(
    tmp_path,
):
    @task
    def slow(name):
        time.sleep(1.5)
        (tmp_path / name).touch()

    @flow(task_runner=ConcurrentTaskRunner(max_workers=1))
    def test_flow():
        slow("running")
        slow("queued")
        raise LookupError("from the body")

    started = time.monotonic()
    state = test_flow()
    assert time.monotonic() - started < 1.5
    assert state.is_failed()
    with pytest.raises(LookupError, match="from the body"):
        state.result()
    assert state.message == "Flow run 'test_flow' raised LookupError: from the body"
    # The running call's thread is not waited for; the queued call never runs.
    assert holds_within(lambda: (tmp_path / "running").exists(), 10)
    time.sleep(2)
    assert not (tmp_path / "queued").exists()


def test_a_flow_returns_completed_with_its_value_and_fails_on_a_failed_state():
    @task
    def boom():
        raise ValueError("nope")

    @flow
    def plain():
        return {"answer": 42}

    @flow
    def returns_a_failure():
        return [1, boom()]

    assert plain().result() == {"answer": 42}
    state = returns_a_failure()
    assert state.is_failed()
    assert state.message == "1/1 states returned by flow run 'returns_a_failure' did not complete."
    value, failed = state.result(raise_on_failure=False)
    assert value == 1 and failed.is_failed()


def test_outside_a_flow_a_task_is_a_plain_call():
    @task
    def double(x):
        return 2 * x

    @task
    async def async_double(x):
        return 2 * x

    assert double(21) == 42
    assert anyio.run(async_double, 4) == 8
    with pytest.raises(RuntimeError, match="can only be submitted inside a flow"):
        double.submit(1)
    assert double.name == "double" and double.__name__ == "double"


def test_submit_is_the_explicit_spelling_and_futures_block_in_a_sync_flow():
    @task
    def double(x):
        return 2 * x

    @task
    async def async_double(x):
        return 2 * x

    @flow(task_runner=SequentialTaskRunner())
    def test_flow():
        future = double.submit(21)
        coroutine_task = async_double(2)  # an async task in a sync flow: a future at once
        assert isinstance(future, PrefectFuture) and isinstance(coroutine_task, PrefectFuture)
        assert not future.asynchronous
        return future.result() + coroutine_task.result()

    assert test_flow().result() == 46


def test_arguments_are_checked_when_the_task_is_called():
    @task
    def one_argument(x):
        return x

    @flow
    def test_flow():
        one_argument(1, 2)

    state = test_flow()
    with pytest.raises(TypeError, match="Task 'one_argument': too many positional arguments"):
        state.result()
    with pytest.raises(TypeError, match="Flow 'test_flow': too many positional arguments"):
        test_flow(1)


def test_names_and_task_run_names():
    @task(name="renamed")
    def original():
        return 1

    seen = []

    @flow(name="my-flow", task_runner=SequentialTaskRunner())
    def test_flow():
        seen.extend(original() for _ in range(2))

    assert original.name == "renamed"
    assert test_flow.name == "my-flow"
    assert test_flow().is_completed()
    assert [future.task_run.name for future in seen] == ["renamed-0", "renamed-1"]


def test_the_default_runner_is_concurrent_and_runner_classes_and_twins_are_accepted():
    @flow
    def default():
        return 1

    assert type(default.task_runner) is ConcurrentTaskRunner and default.task_runner.max_workers is None

    for task_runner in (
        SequentialTaskRunner,
        taskrunners.sync.ConcurrentTaskRunner(),
        taskrunners.sync.SequentialTaskRunner,
    ):
        @flow(task_runner=task_runner)
        def with_runner():
            return identity(3)

        assert with_runner().result().result() == 3


def test_unsuitable_runners_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="`task_runner` must be one of taskrunners' runners"):
        flow(task_runner="concurrent")(lambda: None)

    @flow
    def later():
        return None

    with pytest.raises(TypeError, match="must be one of taskrunners' runners"):
        later.task_runner = object()

    @flow(task_runner=taskrunners.sync.ConcurrentTaskRunner())
    async def async_flow():
        return None

    with pytest.raises(TypeError, match=r"use taskrunners.ConcurrentTaskRunner\(...\)"):
        anyio.run(async_flow)


def test_one_runner_instance_serves_a_flow_called_from_two_threads_at_once(tmp_path):
    shared = ConcurrentTaskRunner()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    @task
    def meet(own, other):
        return payloads.meet(own, other, 60).result()

    @flow(task_runner=shared)
    def test_flow(own, other):
        return meet(own, other)

    results = {}
    threads = [
        threading.Thread(target=lambda: results.update(a=test_flow(a, b))),
        threading.Thread(target=lambda: results.update(b=test_flow(b, a))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["a"].result().result() is True
    assert results["b"].result().result() is True
    assert not shared.is_started
    # Both ended, so the instance itself is free again.
    assert test_flow(str(tmp_path / "c"), a).result().result() is True


def test_a_subflow_given_its_parents_runner_runs_on_a_copy_with_its_settings():
    shared = ConcurrentTaskRunner(max_workers=3)
    seen = {}

    @flow(task_runner=shared)
    def child():
        seen["child"] = identity(1).task_runner

    @flow(task_runner=shared)
    def parent():
        seen["parent"] = identity(1).task_runner
        return child()

    assert parent().result().is_completed()
    core = seam.core_of(shared)
    assert seen["parent"] is core
    assert seen["child"] is not core
    assert type(seen["child"]) is type(core) and seen["child"].max_workers == 3


@in_process_runners()
def test_a_flow_runs_again_on_the_same_runner(runner):
    @flow(task_runner=runner.make())
    def test_flow(x):
        return identity(x)

    assert [test_flow(x).result().result() for x in range(3)] == [0, 1, 2]


def test_subflow_arguments_resolve_and_a_failed_upstream_stops_the_subflow(tmp_path):
    ran = tmp_path / "child-ran"

    @task
    def boom():
        raise ValueError("no")

    @flow
    def child(value):
        ran.touch()
        return value * 2

    @flow
    def parent():
        return child(identity(21)), child(boom())

    good, not_ready = parent().result(raise_on_failure=False)
    assert good.result() == 42
    assert not_ready.name == "NotReady"
    assert ran.exists()
    ran.unlink()
    assert parent().is_failed() and ran.exists()  # only the first child ran again


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@in_process_runners()
def test_an_async_flow_cancelled_from_outside_stops_and_can_run_again(runner, backend):
    @task
    async def sleepy(seconds):
        await anyio.sleep(seconds)
        return seconds

    task_runner = runner.make()

    @flow(task_runner=task_runner)
    async def test_flow(seconds):
        return await sleepy(seconds)

    async def main():
        with anyio.move_on_after(0.3) as scope:
            await test_flow(60)
        assert scope.cancelled_caught
        assert not task_runner.is_started
        return await test_flow(0)

    assert anyio.run(main, backend=backend).result().result() == 0


def test_the_flow_context_ends_with_the_flow():
    @task
    def double(x):
        return 2 * x

    @flow
    def test_flow():
        return double(1)

    assert test_flow().result() == Completed(data=2)
    assert double(2) == 4  # after the flow: a plain call again


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync-flow", "async-flow"])
def test_a_task_submitted_after_its_flow_ended_says_the_block_has_ended(asynchronous):
    # A context copied inside the flow (as a thread started there gets) outlives it.
    @task
    def double(x):
        return 2 * x

    contexts = []

    if asynchronous:

        @flow
        async def test_flow():
            contexts.append(contextvars.copy_context())

        anyio.run(test_flow)
    else:

        @flow
        def test_flow():
            contexts.append(contextvars.copy_context())

        test_flow()
    with pytest.raises(RuntimeError) as caught:
        contexts[0].run(double, 1)
    assert str(caught.value) == BLOCK_ENDED
