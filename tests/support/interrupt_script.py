"""A script waiting on a runner, for the Ctrl-C tests (tests/test_interrupts.py).

Usage: python -m tests.support.interrupt_script <RunnerClassName> '<kwargs as JSON>' <mode> <marker>

``mode`` is how the runner is driven: ``twin`` (a plain script on the blocking twin),
``asyncio`` or ``trio`` (the async facade under ``asyncio.run`` / ``anyio.run``),
``flow`` (a sync flow) or ``async-flow`` (an async flow under ``asyncio.run``). Each
call writes ``<marker>-<n>`` when it starts, then sleeps for two minutes; the script
submits four and waits for each in turn, so it only ends early if interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import anyio

import taskrunners
import taskrunners.sync
from taskrunners import TaskRun, flow, task
from taskrunners.states import Completed

CALLS = 4
SLEEP_SECONDS = 120


def sleep_long(marker):
    with open(marker, "w") as file:
        file.write(str(os.getpid()))
    time.sleep(SLEEP_SECONDS)
    return Completed(data=None)


@task
def sleep_task(marker):
    sleep_long(marker)


def twin(runner_class, kwargs, marker):
    runner = getattr(taskrunners.sync, runner_class)(**kwargs)
    with runner.start():
        futures = [
            runner.submit(TaskRun(), sleep_long, {"marker": f"{marker}-{n}"}) for n in range(CALLS)
        ]
        for future in futures:
            runner.wait(future)


async def facade(runner_class, kwargs, marker):
    runner = getattr(taskrunners, runner_class)(**kwargs)
    async with runner.start():
        futures = [
            await runner.submit(TaskRun(), sleep_long, {"marker": f"{marker}-{n}"})
            for n in range(CALLS)
        ]
        for future in futures:
            await runner.wait(future)


def sync_flow(runner_class, kwargs, marker):
    @flow(task_runner=getattr(taskrunners, runner_class)(**kwargs))
    def sleepers():
        for future in [sleep_task(f"{marker}-{n}") for n in range(CALLS)]:
            future.wait()

    sleepers()


async def async_flow(runner_class, kwargs, marker):
    @flow(task_runner=getattr(taskrunners, runner_class)(**kwargs))
    async def sleepers():
        for future in [sleep_task(f"{marker}-{n}") for n in range(CALLS)]:
            await future.wait()

    await sleepers()


def main() -> None:
    runner_class, kwargs, mode, marker = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:5]
    if mode == "twin":
        twin(runner_class, kwargs, marker)
    elif mode == "asyncio":
        asyncio.run(facade(runner_class, kwargs, marker))
    elif mode == "trio":
        anyio.run(facade, runner_class, kwargs, marker, backend="trio")
    elif mode == "flow":
        sync_flow(runner_class, kwargs, marker)
    elif mode == "async-flow":
        asyncio.run(async_flow(runner_class, kwargs, marker))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("NOT INTERRUPTED", flush=True)


if __name__ == "__main__":
    main()
