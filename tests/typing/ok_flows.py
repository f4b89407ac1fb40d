"""Typed flows and tasks, as a user writes them: this must check with no errors."""

from typing import Dict, List

import anyio

import taskrunners
from taskrunners import (
    ConcurrentTaskRunner,
    ParallelTaskRunner,
    SequentialTaskRunner,
    as_completed,
    flow,
    task,
    unmapped,
)
from taskrunners.states import Completed, State


@task
def add(x: int, y: int = 0) -> int:
    return x + y


@task(name="fetch-page", retries=2, retry_delay_seconds=[0.1, 1])
async def fetch(url: str) -> str:
    await anyio.sleep(0)
    return url


@task(retries=1, retry_delay_seconds=0.5)
def hand_over(value: int) -> State[int]:
    return Completed(data=value)


@flow(task_runner=SequentialTaskRunner())
def totals(values: List[int]) -> Dict[str, int]:
    one = add(1, y=2)  # a PrefectFuture: its data reaches add() below
    mapped = add.map(values, unmapped(10))
    explicit = add.submit(3)
    done, not_done = taskrunners.wait([one, explicit], timeout=10)
    first = next(iter(as_completed(mapped, timeout=60)))
    # Futures passed for arguments reach add() as their data, but type checkers see a
    # PrefectFuture[int, Sync] where add() takes an int: such a call needs an ignore.
    chained = add(one, add(hand_over(4)))  # type: ignore[arg-type]
    return {
        "sum": chained.result(),
        "first": first.result(),
        "finished": len(done) - len(not_done),
    }


@flow(name="pages", task_runner=ConcurrentTaskRunner)
async def pages(urls: List[str]) -> List[str]:
    futures = [await fetch(url) for url in urls]
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(fetch, "https://example.org/later")
    done, _ = await taskrunners.wait(futures)
    return [await future.result() async for future in as_completed(done)]


@flow
def parent() -> int:
    state = totals([1, 2, 3])  # a subflow, on its own runner
    return state.result()["sum"] + add(1).result()


def main() -> None:
    state = totals([1, 2, 3])
    print(state.is_completed(), state.result(raise_on_failure=False))
    totals.task_runner = ParallelTaskRunner(max_workers=2)
    print(add(20, 22), parent().result())
    print(anyio.run(pages, ["https://example.org"]).result())


async def amain() -> State[List[str]]:
    return await pages(["https://example.org"])


if __name__ == "__main__":
    main()
