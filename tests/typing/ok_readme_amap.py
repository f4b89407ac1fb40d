# The README's example under "Many calls: `map` and `amap`", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

import itertools

import anyio

from taskrunners.compat.futures import RunnerExecutor
from taskrunners.sync import ParallelTaskRunner


async def main() -> None:
    with RunnerExecutor(ParallelTaskRunner(max_workers=2)) as executor:
        async for square in executor.amap(pow, itertools.count(), itertools.repeat(2), buffersize=100):
            if square > 50:
                print(square)  # 64
                break


if __name__ == "__main__":
    anyio.run(main)
