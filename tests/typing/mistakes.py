"""Mistakes a user's type checker must report: each line marked ``# E: <code>``, once.

tests/test_typing.py runs mypy on this file and expects exactly one error, with that
error code, on each marked line, and none elsewhere.
"""

from typing import List

import taskrunners
import taskrunners.sync
from taskrunners import PrefectFuture, SequentialTaskRunner, flow, task
from taskrunners.compat.futures import RunnerExecutor
from taskrunners.futures import Async, Sync
from taskrunners.states import Completed, State


@task
def add(x: int, y: int) -> int:
    return x + y


@flow(task_runner=SequentialTaskRunner())
def total(values: List[int]) -> int:
    return sum(values)


@flow
async def async_total(values: List[int]) -> int:
    return sum(values)


@task
async def shout(word: str) -> str:
    return word.upper()


def square(x: int) -> State[int]:
    return Completed(data=x * x)


def count(word: str) -> int:
    return len(word)


def arguments() -> None:
    add(1, z=2)  # E: call-arg
    add(1, 2, 3)  # E: call-arg
    add("1", 2)  # E: arg-type
    add.submit(x=1)  # E: call-arg
    total("1, 2, 3")  # E: arg-type
    total(valuez=[1])  # E: call-arg
    task(retries="3")  # E: call-overload
    task(timeout_seconds="10")  # E: call-overload
    task(timeout=10)  # E: call-overload


def settings() -> None:
    taskrunners.DaskTaskRunner(max_wokers=2)  # E: call-arg
    taskrunners.sync.ParallelTaskRunner(max_worker=2)  # E: call-arg
    taskrunners.ConcurrentTaskRunner(max_workers="2")  # E: arg-type
    taskrunners.RayTaskRunner(init_kwargs=["num_cpus", 2])  # E: arg-type
    taskrunners.ParallelTaskRunner(batch_size="autoo")  # E: arg-type
    taskrunners.sync.DaskTaskRunner(batch_size=2.5)  # E: arg-type
    taskrunners.ParallelTaskRunner().max_workers = 4  # E: assignment
    taskrunners.sync.RayTaskRunner().batch_size = 2.5  # E: assignment


async def sync_and_async(
    blocking: PrefectFuture[int, Sync], awaited: PrefectFuture[int, Async]
) -> None:
    await blocking.wait()  # E: misc
    await taskrunners.wait([blocking])  # E: misc
    awaited.result() + 1  # E: operator
    awaited.wait().result()  # E: attr-defined
    print(taskrunners.wait([awaited]).done)  # E: attr-defined
    for future in taskrunners.as_completed([awaited]):
        future.result() + 1  # E: operator
    async_total([1])  # E: unused-coroutine
    async_total([1]).result()  # E: attr-defined
    await total([2])  # E: misc


async def blocking_twin(twin: taskrunners.sync.ConcurrentTaskRunner) -> None:
    with twin.start() as runner:
        await runner.wait(runner.submit(taskrunners.TaskRun(), square, {}))  # E: misc
        runner.submit(taskrunners.TaskRun(), print, {})  # E: arg-type


@flow
def results() -> None:
    add(1, 2).result().upper()  # E: attr-defined
    state: State[str] = add.submit(1, 2).wait()  # E: assignment
    print(state)
    add.submit(1, 2).wait().result().upper()  # E: attr-defined
    len(add.map([1], [2])[0].result())  # E: arg-type
    flow_state: State[str] = total([1])  # E: assignment
    print(flow_state)


@flow
async def async_results() -> None:
    (await shout("a")).result().upper()  # E: attr-defined
    (await (await shout("a")).result()) + 1  # E: operator


def executor_results(twin: taskrunners.sync.ConcurrentTaskRunner) -> None:
    with RunnerExecutor(twin) as executor:
        executor.submit(count, "four").result().upper()  # E: attr-defined
        executor.submit(count, 4)  # E: call-overload
        for value in executor.map(count, ["four"]):
            value.upper()  # E: attr-defined


async def async_count(word: str) -> int:
    return len(word)


async def executor_map_results(twin: taskrunners.sync.ParallelTaskRunner) -> None:
    with RunnerExecutor(twin) as executor:
        for number in executor.map(async_count, ["four"], chunksize=2, buffersize=4):
            number.upper()  # E: attr-defined
        async for value in executor.amap(count, ["four"]):
            value.upper()  # E: attr-defined
        executor.map(count, ["four"], chunksize="auto")  # E: call-overload
