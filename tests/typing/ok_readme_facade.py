# The README's example under "From async code: the facade", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

import anyio

from taskrunners import ConcurrentTaskRunner, TaskRun
from taskrunners.states import Completed


async def fetch(delay, label):
    await anyio.sleep(delay)
    return Completed(data=label)


async def main():
    async with ConcurrentTaskRunner().start() as runner:
        futures = [await runner.submit(TaskRun(), fetch, {"delay": 0.1, "label": i}) for i in range(100)]
        states = [await runner.wait(future) for future in futures]
    print(sum(state.result() for state in states))  # 4950, in about 0.1 s


anyio.run(main)                   # asyncio
anyio.run(main, backend="trio")   # trio
