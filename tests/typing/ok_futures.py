"""Futures from the blocking twins and the async facade: this must check with no errors.

A blocking future (``PrefectFuture[int, Sync]``) blocks in ``wait()`` and ``result()``;
an awaited one (``PrefectFuture[int, Async]``) returns awaitables. ``taskrunners.wait``
and ``taskrunners.as_completed`` follow the futures they are given.
"""

from typing import List, Optional

import anyio

import taskrunners
import taskrunners.sync
from taskrunners import PrefectFuture, TaskRun
from taskrunners.futures import Async, Sync
from taskrunners.states import Completed, State


def square(x: int) -> State[int]:
    return Completed(data=x * x)


async def async_square(x: int) -> State[int]:
    await anyio.sleep(0)
    return Completed(data=x * x)


def blocking() -> int:
    with taskrunners.sync.ConcurrentTaskRunner(max_workers=2).start() as runner:
        futures: List[PrefectFuture[int, Sync]] = [
            runner.submit(TaskRun(name=f"square-{i}"), square, {"x": i}) for i in range(4)
        ]
        limited: PrefectFuture[int, Sync] = runner.submit(TaskRun(), square, {"x": 5}, timeout_seconds=30)
        futures.append(limited)
        first = futures[0].wait().result()  # no timeout: always a State
        late: Optional[State[int]] = futures[1].wait(timeout=0.1)
        done, not_done = taskrunners.wait(futures, timeout=10)
        ordered = [future.result(timeout=10) for future in taskrunners.as_completed(futures)]
        return first + len(done) + len(not_done) + sum(ordered) + (late is None)


async def awaited() -> int:
    async with taskrunners.ConcurrentTaskRunner().start() as runner:
        futures = [await runner.submit(TaskRun(), async_square, {"x": i}) for i in range(4)]
        futures.append(await runner.submit(TaskRun(), async_square, {"x": 5}, timeout_seconds=30))
        state = await runner.wait(futures[0])
        first = state.result() if state is not None else 0
        second = (await futures[1].wait()).result()
        third = await futures[2].result()
        done, not_done = await taskrunners.wait(futures, timeout=10)
        ordered = [await future.result() async for future in taskrunners.as_completed(futures)]
        return first + second + third + len(done) + len(not_done) + sum(ordered)


async def first_of(futures: List[PrefectFuture[int, Async]]) -> Optional[State[int]]:
    async for future in taskrunners.as_completed(futures, timeout=60):
        return await future.wait(timeout=0)
    return None


if __name__ == "__main__":
    print(blocking(), anyio.run(awaited))
