"""Result types survive: what type checkers infer for futures, States and executors.

Each ``assert_type`` holds for mypy and pyright alike (tests/test_typing.py runs both):
a task call, ``submit`` and ``map`` give futures of the function's return type (of a
returned State's data), ``result()`` gives that type and ``wait()`` a State of it; a
flow call gives a State of the flow's return type; a runner's ``submit`` gives a
future of its run_fn's State; ``RunnerExecutor`` is typed as the standard library's
executors are.
"""

import concurrent.futures
from typing import Any, Coroutine, Iterator, List, Optional, Set, Union

import anyio
from typing_extensions import assert_type

import taskrunners
import taskrunners.sync
from taskrunners import PrefectFuture, TaskRun, flow, task
from taskrunners.compat.futures import RunnerExecutor
from taskrunners.futures import Async, DoneAndNotDone, Sync
from taskrunners.states import Completed, State


@task
def add(x: int, y: int = 0) -> int:
    return x + y


@task
async def shout(word: str) -> str:
    await anyio.sleep(0)
    return word.upper()


@task
def hand_over(value: int) -> State[int]:
    return Completed(data=value)


@task
async def hand_over_later(value: str) -> State[str]:
    return Completed(data=value)


@flow
def sums(values: List[int]) -> int:
    one = add(1, 2)
    assert_type(one, PrefectFuture[int, Sync])
    assert_type(add.submit(3), PrefectFuture[int, Sync])
    assert_type(hand_over(4), PrefectFuture[int, Sync])
    mapped = add.map(values, taskrunners.unmapped(10))
    assert_type(mapped, List[PrefectFuture[int, Sync]])
    assert_type(one.result(), int)
    assert_type(one.result(timeout=5, raise_on_failure=False), int)
    assert_type(one.wait(), State[int])
    assert_type(one.wait().result(), int)
    assert_type(one.wait().result(raise_on_failure=False), Union[int, BaseException])
    assert_type(one.wait(timeout=1), Optional[State[int]])
    done, not_done = taskrunners.wait(mapped)
    assert_type(done, Set[PrefectFuture[int, Sync]])
    for future in taskrunners.as_completed(mapped):
        assert_type(future, PrefectFuture[int, Sync])
    return one.result() + sum(future.result() for future in mapped)


@flow
async def shouts(words: List[str]) -> List[str]:
    future = await shout(words[0])
    assert_type(future, PrefectFuture[str, Async])
    assert_type(await shout.submit("b"), PrefectFuture[str, Async])
    assert_type(await hand_over_later("c"), PrefectFuture[str, Async])
    submission = assert_type(shout("d"), Coroutine[Any, Any, PrefectFuture[str, Async]])
    await submission
    mapped = await shout.map(words)
    assert_type(mapped, List[PrefectFuture[str, Async]])
    assert_type(await future.result(), str)
    assert_type(await future.wait(), State[str])
    assert_type(await future.wait(timeout=1), Optional[State[str]])
    done, _ = await taskrunners.wait(mapped)
    assert_type(done, Set[PrefectFuture[str, Async]])
    return [await future.result() async for future in taskrunners.as_completed(mapped)]


def flow_calls() -> None:
    assert_type(sums([1, 2]), State[int])
    assert_type(sums([1, 2]).result(), int)
    call = assert_type(shouts(["a"]), Coroutine[Any, Any, State[List[str]]])
    call.close()
    assert_type(anyio.run(shouts, ["a"]), State[List[str]])


def square(x: int) -> State[int]:
    return Completed(data=x * x)


async def async_square(x: int) -> State[int]:
    await anyio.sleep(0)
    return Completed(data=x * x)


def runners() -> None:
    with taskrunners.sync.ConcurrentTaskRunner().start() as runner:
        future = runner.submit(TaskRun(), square, {"x": 2})
        assert_type(future, PrefectFuture[int, Sync])
        assert_type(runner.submit(TaskRun(), async_square, {"x": 2}), PrefectFuture[int, Sync])
        assert_type(runner.wait(future), State[int])
        assert_type(runner.wait(future, timeout=1), Optional[State[int]])
        assert_type(future.result(), int)
        results: DoneAndNotDone[int, Sync] = taskrunners.wait([future])
        assert_type(results.done, Set[PrefectFuture[int, Sync]])


async def facade() -> None:
    async with taskrunners.ConcurrentTaskRunner().start() as runner:
        future = await runner.submit(TaskRun(), async_square, {"x": 2})
        assert_type(future, PrefectFuture[int, Async])
        blocking = await runner.submit(TaskRun(), square, {"x": 2}, asynchronous=False)
        assert_type(blocking, PrefectFuture[int, Sync])
        assert_type(await runner.wait(future), State[int])
        assert_type(await runner.wait(future, timeout=1), Optional[State[int]])
        assert_type(await future.result(), int)
        assert_type(blocking.result(), int)


def either_mode(future: PrefectFuture[int]) -> None:
    # A future whose mode is left out: its result may be awaitable or not.
    assert_type(future, PrefectFuture[int, Any])


def length(word: str) -> int:
    return len(word)


async def alength(word: str) -> int:
    await anyio.sleep(0)
    return len(word)


def executor() -> None:
    with RunnerExecutor(taskrunners.sync.ConcurrentTaskRunner()) as pool:
        future = pool.submit(length, "four")
        assert_type(future, concurrent.futures.Future[int])
        assert_type(future.result(), int)
        assert_type(pool.submit(alength, word="four"), concurrent.futures.Future[int])
        assert_type(pool.map(length, ["a", "bb"]), Iterator[int])
        assert_type(pool.map(add.fn, [7, 9], [2, 4], timeout=10), Iterator[int])


if __name__ == "__main__":
    print(sums([1, 2]).result(), anyio.run(shouts, ["a", "b"]).result())
    runners()
    anyio.run(facade)
    executor()
