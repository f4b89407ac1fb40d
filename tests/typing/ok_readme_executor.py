# The README's example under "A `concurrent.futures.Executor` over any runner", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

from taskrunners.compat.futures import RunnerExecutor
from taskrunners.sync import ConcurrentTaskRunner

with RunnerExecutor(ConcurrentTaskRunner(max_workers=2)) as executor:
    print(list(executor.map(pow, [2, 3, 4], [2, 2, 2])))  # [4, 9, 16]
    print(executor.submit(divmod, 7, 2).result())         # (3, 1)
