"""Run a few calls on a RayTaskRunner in a fresh process; print what happened as JSON.

Used by tests/test_ray.py where the test process cannot do it itself: it holds its
own Ray connection, and a process holds one at a time.

    python -m tests.support.ray_join [--address ADDRESS] [--mode sync|asyncio|trio] [--init-kwargs JSON]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import anyio

from taskrunners import TaskRun
from tests.support import payloads
from tests.support.pickling import register_payloads


def run_calls(runner, mode: str) -> list:
    def calls_sync() -> list:
        with runner.start():
            first = runner.submit(TaskRun(), payloads.return_value, {"value": 20})
            second = runner.submit(TaskRun(), payloads.add_upstream, {"upstream": first, "y": 1})
            third = runner.submit(TaskRun(), payloads.async_return_value, {"value": "async"})
            return [runner.wait(future).result() for future in (first, second, third)]

    async def calls_async() -> list:
        async with runner.start():
            first = await runner.submit(TaskRun(), payloads.return_value, {"value": 20})
            second = await runner.submit(TaskRun(), payloads.add_upstream, {"upstream": first, "y": 1})
            third = await runner.submit(TaskRun(), payloads.async_return_value, {"value": "async"})
            return [(await runner.wait(future)).result() for future in (first, second, third)]

    if mode == "sync":
        return calls_sync()
    return anyio.run(calls_async, backend=mode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default=None)
    parser.add_argument("--mode", default="sync", choices=["sync", "asyncio", "trio"])
    parser.add_argument("--init-kwargs", default=None)
    args = parser.parse_args()

    records = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("task_runner").addHandler(Keep())
    logging.getLogger("task_runner").setLevel(logging.INFO)
    imported_ray_early = "ray" in sys.modules

    import ray.cloudpickle

    import taskrunners
    import taskrunners.sync

    register_payloads(ray.cloudpickle)
    module = taskrunners.sync if args.mode == "sync" else taskrunners
    init_kwargs = json.loads(args.init_kwargs) if args.init_kwargs else None
    runner = module.RayTaskRunner(address=args.address, init_kwargs=init_kwargs)
    results = run_calls(runner, args.mode)
    print(
        json.dumps(
            {
                "results": results,
                "initialized_after": ray.is_initialized(),
                "imported_ray_early": imported_ray_early,
                "log": records,
            }
        )
    )


if __name__ == "__main__":
    main()
