"""A script that leaves calls pending in a RunnerExecutor at interpreter exit.

Usage: python -m tests.support.executor_exit_script <RunnerClassName> '<kwargs as JSON>' <variant> <dir>

It submits three calls that each sleep half a second and then write a file in
``<dir>``, and ends without waiting for them: with no ``shutdown()`` at all
(``no-shutdown``), after ``shutdown(wait=False)`` (``shutdown-nowait``), or with an
atexit handler that submits one more call once the interpreter is exiting
(``atexit-submit``, which prints what that submit raised).
"""

from __future__ import annotations

import atexit
import json
import pathlib
import sys
import time

import taskrunners.sync
from taskrunners.compat.futures import RunnerExecutor


def nap_then_mark(marker):
    time.sleep(0.5)
    pathlib.Path(marker).write_text("done")
    return marker


def main() -> None:
    runner_class, kwargs, variant, directory = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:5]
    executor = RunnerExecutor(getattr(taskrunners.sync, runner_class)(**kwargs))
    for n in range(3):
        executor.submit(nap_then_mark, str(pathlib.Path(directory) / f"call-{n}"))
    if variant == "shutdown-nowait":
        executor.shutdown(wait=False)
    elif variant == "atexit-submit":

        def submit_late() -> None:
            try:
                executor.submit(nap_then_mark, str(pathlib.Path(directory) / "late"))
            except RuntimeError as exc:
                print(f"refused: {exc}", flush=True)

        atexit.register(submit_late)
    print("leaving", flush=True)


if __name__ == "__main__":
    main()
