# The README's example under "From a plain script: the blocking twins", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

from taskrunners import TaskRun
from taskrunners.states import Completed
from taskrunners.sync import ConcurrentTaskRunner


def square(x):
    return Completed(data=x * x)


def total(parts):
    # Futures passed as arguments arrive as their final States.
    return Completed(data=sum(state.result() for state in parts))


with ConcurrentTaskRunner(max_workers=4).start() as runner:
    squares = [runner.submit(TaskRun(name=f"square-{i}"), square, {"x": i}) for i in range(10)]
    summed = runner.submit(TaskRun(name="total"), total, {"parts": squares})
    print(runner.wait(summed).result())  # 285
