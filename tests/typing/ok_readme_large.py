# The README's example under "Large values: once per worker", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

import numpy as np
from taskrunners.sync import ParallelTaskRunner
from taskrunners import TaskRun
from taskrunners.states import Completed

def total(array):
    return Completed(data=float(array.sum()))

array = np.ones(2_000_000)                       # 16 MB
with ParallelTaskRunner(max_workers=2).start() as runner:
    futures = [runner.submit(TaskRun(), total, {"array": array}) for _ in range(16)]
    assert [runner.wait(f).result() for f in futures] == [2_000_000.0] * 16
