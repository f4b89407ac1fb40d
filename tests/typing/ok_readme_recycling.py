# The README's example under "Recycling workers", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

from taskrunners import TaskRun
from taskrunners.states import Completed
from taskrunners.sync import ParallelTaskRunner


def pid():
    import os

    return Completed(data=os.getpid())


if __name__ == "__main__":
    with ParallelTaskRunner(max_workers=2, max_calls_per_worker=2).start() as runner:
        futures = [runner.submit(TaskRun(), pid, {}) for _ in range(8)]
        pids = {runner.wait(future).result() for future in futures}
    print(len(pids), "worker processes ran 8 calls")  # 4 at least
