"""A plain sync script waiting on a runner, for the Ctrl-C test (tests/test_interrupts.py).

Usage: python -m tests.interrupt_script <RunnerClassName> '<constructor kwargs as JSON>'
Prints READY once its calls are running, then waits on them.
"""

import json
import sys
import time

import taskrunners.sync
from taskrunners import TaskRun
from taskrunners.states import Completed


def sleep_long():
    time.sleep(120)
    return Completed(data=None)


def main() -> None:
    runner_class = getattr(taskrunners.sync, sys.argv[1])
    runner = runner_class(**json.loads(sys.argv[2]))
    with runner.start():
        futures = [runner.submit(TaskRun(), sleep_long, {}) for _ in range(4)]
        time.sleep(1.0)  # let the calls reach their workers
        print("READY", flush=True)
        for future in futures:
            runner.wait(future)


if __name__ == "__main__":
    main()
