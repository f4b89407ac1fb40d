"""Ctrl-C while ``RunnerExecutor.map`` runs: ``python -m ... RUNNER_CLASS DIRECTORY``.

A Ctrl-C comes once the fourth item has started; prints how many items ran in all
after the executor shut down.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import taskrunners.sync
from taskrunners.compat.futures import RunnerExecutor
from tests.support.map_payloads import calls_recorded, record_call

COUNT = 200


def interrupt_when(marker: str) -> None:
    while not os.path.exists(marker):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)


def main(runner_class: str, directory: str) -> None:
    kwargs = {} if runner_class == "SequentialTaskRunner" else {"max_workers": 2}
    runner = getattr(taskrunners.sync, runner_class)(**kwargs)
    executor = RunnerExecutor(runner)
    threading.Thread(target=interrupt_when, args=(os.path.join(directory, "3"),), daemon=True).start()
    taken = 0
    try:
        items = [directory] * COUNT, range(COUNT), [0.2] * COUNT
        for _ in executor.map(record_call, *items, chunksize=1):
            taken += 1
    except KeyboardInterrupt:
        print("interrupted")
    executor.shutdown(wait=True)
    print("ran", len(calls_recorded(directory)), "taken", taken)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
