"""A plain script using the blocking ParallelTaskRunner, run by tests/test_parallel.py.

Deliberately without an ``if __name__ == "__main__"`` guard: functions defined here
live in ``__main__`` and reach the workers by value.

``python parallel_script.py main``: prints the results of a ``__main__`` function, a
lambda and a closure, as JSON.
``python parallel_script.py interrupt DIR``: starts two long calls, prints "waiting"
once both run, then waits for them (the test sends SIGINT).
"""

import json
import os
import pathlib
import sys
import time

from taskrunners import TaskRun
from taskrunners.states import Completed
from taskrunners.sync import ParallelTaskRunner


def square(x):
    return Completed(data=x * x)


def make_adder(n):
    def add(x):
        return Completed(data=x + n)

    return add


def sleep_in_worker(marker, seconds):
    pathlib.Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return Completed(data=None)


mode = sys.argv[1]
runner = ParallelTaskRunner(max_workers=2)
with runner.start():
    if mode == "main":
        futures = [
            runner.submit(TaskRun(), square, {"x": 7}),
            runner.submit(TaskRun(), lambda: Completed(data=os.getpid()), {}),
            runner.submit(TaskRun(), make_adder(10), {"x": 5}),
        ]
        squared, pid, added = [runner.wait(future).result() for future in futures]
        print(json.dumps({"square": squared, "other_pid": pid != os.getpid(), "add": added}))
    elif mode == "interrupt":
        directory = pathlib.Path(sys.argv[2])
        markers = [directory / "first", directory / "second"]
        futures = [
            runner.submit(TaskRun(), sleep_in_worker, {"marker": str(marker), "seconds": 120})
            for marker in markers
        ]
        queued = [runner.submit(TaskRun(), sleep_in_worker, {"marker": os.devnull, "seconds": 120})]
        while not all(marker.exists() for marker in markers):
            time.sleep(0.01)
        print("waiting", flush=True)
        runner.wait(futures[0])
        print("not interrupted", flush=True)
