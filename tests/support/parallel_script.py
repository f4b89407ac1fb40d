"""A plain script using the blocking ParallelTaskRunner, run by tests/test_parallel.py.

Deliberately without an ``if __name__ == "__main__"`` guard: functions defined here
live in ``__main__`` and reach the workers by value.

``python parallel_script.py main``: prints the results of a ``__main__`` function, a
lambda and a closure, as JSON.
``python parallel_script.py interrupt DIR``: starts two long calls, prints "waiting"
once both run, then waits for them (the test sends SIGINT).
``python parallel_script.py abort ROUNDS DIR``: ROUNDS times, starts two long calls and
queues twenty more, then leaves the block with an exception once the long ones run;
prints, as JSON, whether every queued call ended cancelled.
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


def quick():
    return Completed(data=None)


class Stop(Exception):
    pass


def leave_with_queued_calls(directory, round_number):
    markers = [directory / f"{round_number}-{i}" for i in range(2)]
    runner = ParallelTaskRunner(max_workers=2)
    try:
        with runner.start():
            for marker in markers:
                runner.submit(TaskRun(), sleep_in_worker, {"marker": str(marker), "seconds": 120})
            queued = [runner.submit(TaskRun(), quick, {}) for _ in range(20)]
            while not all(marker.exists() for marker in markers):
                time.sleep(0.01)
            raise Stop
    except Stop:
        pass
    return all(future._call.cancelled() for future in queued)


mode = sys.argv[1]
if mode == "abort":
    rounds, directory = int(sys.argv[2]), pathlib.Path(sys.argv[3])
    cancelled = [leave_with_queued_calls(directory, i) for i in range(rounds)]
    print(json.dumps({"rounds": len(cancelled), "queued_calls_cancelled": all(cancelled)}))
    sys.exit()

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
