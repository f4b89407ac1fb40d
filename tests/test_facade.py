"""The async facade beyond the standard suite: cancellation, pickling, the seed's base class."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import cloudpickle
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import BaseTaskRunner, PrefectFuture, TaskConcurrencyType, TaskRun
from taskrunners.states import Completed
from tests.support import payloads
from tests.support.processes import run_python

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("runner_class", [taskrunners.SequentialTaskRunner, taskrunners.ConcurrentTaskRunner])
async def test_cancelled_from_outside_stops_cleanly_and_can_start_again(anyio_backend, runner_class):
    runner = runner_class()
    futures = []
    with anyio.move_on_after(0.5) as scope:
        async with runner.start():
            if runner_class is taskrunners.ConcurrentTaskRunner:
                futures.append(await runner.submit(TaskRun(), payloads.async_sleep_then_return, {"seconds": 60}))
            await anyio.sleep(60)
    assert scope.cancelled_caught
    assert not runner.is_started
    for future in futures:
        state = await runner.wait(future)
        assert state.is_crashed()
        assert state.message == "Execution was cancelled by the runtime environment."
    async with runner.start():
        future = await runner.submit(TaskRun(), payloads.async_return_value, {"value": "again"})
        assert (await runner.wait(future)).result() == "again"


@pytest.mark.parametrize("module", [taskrunners, taskrunners.sync], ids=["facade", "twin"])
def test_an_unpickled_concurrent_runner_refuses_work_after_serialization(module):
    runner = module.ConcurrentTaskRunner()

    async def pickled_while_started_async():
        async with runner.start():
            future = await runner.submit(TaskRun(), payloads.return_value, {"value": 1})
            return cloudpickle.loads(cloudpickle.dumps(runner)), future

    def pickled_while_started_sync():
        with runner.start():
            future = runner.submit(TaskRun(), payloads.return_value, {"value": 1})
            return cloudpickle.loads(cloudpickle.dumps(runner)), future

    if module is taskrunners:
        copy, future = anyio.run(pickled_while_started_async)
        submit = lambda: anyio.run(copy.submit, TaskRun(), payloads.return_value, {})  # noqa: E731
        wait = lambda: anyio.run(copy.wait, future)  # noqa: E731
    else:
        copy, future = pickled_while_started_sync()
        submit = lambda: copy.submit(TaskRun(), payloads.return_value, {})  # noqa: E731
        wait = lambda: copy.wait(future)  # noqa: E731
    with pytest.raises(RuntimeError, match="cannot be used to submit work after serialization"):
        submit()
    with pytest.raises(RuntimeError, match="cannot be used to wait for work after serialization"):
        wait()


async def test_an_unpickled_sequential_runner_keeps_working(anyio_backend):
    runner = taskrunners.SequentialTaskRunner()
    async with runner.start():
        copy = cloudpickle.loads(cloudpickle.dumps(runner))
        future = await copy.submit(TaskRun(), payloads.async_return_value, {"value": "copy"})
        assert (await copy.wait(future)).result() == "copy"


async def test_futures_of_another_runner_are_resolved_too(anyio_backend):
    async with taskrunners.ConcurrentTaskRunner().start() as first:
        async with taskrunners.SequentialTaskRunner().start() as second:
            upstream = await first.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 0.2, "value": 2})
            future = await second.submit(TaskRun(), payloads.add_upstream, {"upstream": upstream, "y": 3})
            assert (await second.wait(future)).result() == 5


class RecordingRunner(BaseTaskRunner):
    """A runner written against the seed's base class, as a user would."""

    def __init__(self):
        super().__init__()
        self.events = []
        self._states = {}

    @property
    def concurrency_type(self):
        return TaskConcurrencyType.SEQUENTIAL

    async def _start(self, exit_stack: AsyncExitStack) -> None:
        self.events.append("start")
        exit_stack.callback(self.events.append, "stop")

    async def submit(self, task_run, run_fn, run_kwargs, asynchronous=True):
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        self._states[task_run.id] = await run_fn(**run_kwargs)
        return PrefectFuture(task_run, self, asynchronous)

    async def wait(self, prefect_future, timeout=None):
        return self._states[prefect_future.run_id]


async def test_the_seed_base_class_supports_user_runners(anyio_backend):
    runner = RecordingRunner()
    assert runner.name == "recordingrunner" and str(runner) == "RecordingRunner"
    async with runner.start() as started:
        assert started is runner
        with pytest.raises(RuntimeError, match="already started"):
            async with runner.start():
                pass
        future = await runner.submit(TaskRun(), payloads.async_return_value, {"value": 4})
        assert (await future.wait()).result() == 4
        assert await future.result() == 4
    assert runner.events == ["start", "stop"] and not runner.is_started


async def test_result_raises_timeout_error_on_timeout(anyio_backend):
    async with taskrunners.ConcurrentTaskRunner().start() as runner:
        future = await runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 0.5})
        with pytest.raises(TimeoutError, match="did not finish within 0.01 seconds"):
            await future.result(timeout=0.01)
        assert (await future.wait()).is_completed()


def test_importing_taskrunners_imports_no_cluster_engine():
    code = "import taskrunners, sys; print(sorted({'dask','distributed','ray'} & set(sys.modules)))"
    assert run_python("-c", code, check=True).stdout.strip() == "[]"


def test_completed_helper_is_reexported():
    assert Completed(data=1).is_completed()


@pytest.mark.parametrize("class_name", ["SequentialTaskRunner", "ConcurrentTaskRunner", "ParallelTaskRunner"])
def test_a_facade_runner_in_a_plain_with_points_to_async_with_and_the_twin(class_name):
    runner = getattr(taskrunners, class_name)()
    with pytest.raises(TypeError, match=rf"async with runner.start\(\):.*taskrunners\.sync\.{class_name}"):
        with runner.start():
            pass  # pragma: no cover
    assert not runner.is_started
