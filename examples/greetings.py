"""The greetings example: a hello and a goodbye task per name, on the runner you pick.

    python examples/greetings.py sequential   # in order
    python examples/greetings.py concurrent   # threads: the lines may interleave
    python examples/greetings.py parallel     # worker processes
    python examples/greetings.py dask         # a temporary Dask cluster
    python examples/greetings.py ray          # a temporary Ray instance

With the sequential runner every hello comes before its goodbye, name by name; the
others run the tasks at the same time, so their lines interleave. The exit status is
0 when the flow completed.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from taskrunners import (
    ConcurrentTaskRunner,
    DaskTaskRunner,
    ParallelTaskRunner,
    RayTaskRunner,
    SequentialTaskRunner,
    flow,
    task,
)

RUNNERS = {
    "sequential": SequentialTaskRunner,
    "concurrent": ConcurrentTaskRunner,
    "parallel": ParallelTaskRunner,
    "dask": DaskTaskRunner,
    "ray": RayTaskRunner,
}


@task
def say_hello(name: str) -> None:
    print(f"hello {name}")


@task
def say_goodbye(name: str) -> None:
    print(f"goodbye {name}")


@flow(task_runner=SequentialTaskRunner())
def greetings(names: List[str]) -> None:
    for name in names:
        say_hello(name)
        say_goodbye(name)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Greet four people on a task runner.")
    parser.add_argument("runner", nargs="?", default="sequential", choices=list(RUNNERS))
    options = parser.parse_args(argv)
    greetings.task_runner = RUNNERS[options.runner]()
    state = greetings(["arthur", "trillian", "ford", "marvin"])
    return 0 if state.is_completed() else 1


# Process-based runners start workers: the guard keeps them from running this again.
if __name__ == "__main__":
    sys.exit(main())
