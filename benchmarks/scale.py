"""``python -m benchmarks.scale``: a million calls, time and memory growth per call.

No-op calls, 10^4, 10^5 and 10^6 of them (``--sizes``), on Parallel with 2 workers,
through the blocking twin (submit every call, then wait for each), a flow's
``task.map``, ``RunnerExecutor.map`` (and with ``buffersize=1000``) and
``joblib.Parallel(n_jobs=2)``. Each measurement runs in a fresh process, after a
first small batch has started the workers; the ways take turns at each size. Memory
growth is the process's peak resident memory during the calls, less what it held
before them.

Prints a table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["WAYS", "main", "measure"]

WARM_UP = 200


def _noop(item: Any) -> None:
    return None


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _twin(workers: int, calls: int) -> Callable[[Callable[[], None]], None]:
    from benchmarks.workloads import noop
    from taskrunners.futures import TaskRun
    from taskrunners.sync import ParallelTaskRunner

    def run(timed: Callable[[], None]) -> None:
        with ParallelTaskRunner(max_workers=workers).start() as runner:
            def batch(count: int) -> None:
                futures = [runner.submit(TaskRun(), noop, {}) for _ in range(count)]
                for future in futures:
                    runner.wait(future)

            batch(WARM_UP)
            timed(lambda: batch(calls))

    return run


def _task_map(workers: int, calls: int) -> Callable[[Callable[[], None]], None]:
    from taskrunners import ParallelTaskRunner, flow, task

    nothing = task(_noop)

    def run(timed: Callable[[], None]) -> None:
        @flow(task_runner=ParallelTaskRunner(max_workers=workers))
        def mapped() -> None:
            def batch(count: int) -> None:
                for future in nothing.map(range(count)):
                    future.wait()

            batch(WARM_UP)
            timed(lambda: batch(calls))

        mapped()

    return run


def _executor_map(workers: int, calls: int, buffersize: Optional[int] = None) -> Any:
    from taskrunners.compat.futures import RunnerExecutor
    from taskrunners.sync import ParallelTaskRunner

    def run(timed: Callable[[], None]) -> None:
        with RunnerExecutor(ParallelTaskRunner(max_workers=workers)) as executor:
            def batch(count: int) -> None:
                for _ in executor.map(_noop, range(count), buffersize=buffersize):
                    pass

            batch(WARM_UP)
            timed(lambda: batch(calls))

    return run


def _joblib(workers: int, calls: int) -> Callable[[Callable[[], None]], None]:
    import joblib

    def run(timed: Callable[[], None]) -> None:
        with joblib.Parallel(n_jobs=workers) as parallel:
            def batch(count: int) -> None:
                for _ in parallel(joblib.delayed(_noop)(i) for i in range(count)):
                    pass

            batch(WARM_UP)
            timed(lambda: batch(calls))

    return run


#: The ways to make many calls, by the name the table shows.
WAYS: Dict[str, Callable[[int, int], Callable[[Callable[[], None]], None]]] = {
    "twin submit+wait": _twin,
    "flow task.map": _task_map,
    "RunnerExecutor.map": _executor_map,
    "RunnerExecutor.map buffersize=1000": lambda w, n: _executor_map(w, n, 1000),
    "joblib.Parallel": _joblib,
}


def measure(way: str, calls: int, workers: int = 2) -> Dict[str, float]:
    """Seconds and peak memory growth of ``calls`` no-op calls through ``way``, here."""
    numbers: Dict[str, float] = {}

    def timed(batch: Callable[[], None]) -> None:
        before = _resident_bytes()
        start = time.perf_counter()
        batch()
        numbers["seconds"] = time.perf_counter() - start
        numbers["growth_bytes"] = max(0, _peak_bytes() - before)

    WAYS[way](workers, calls)(timed)
    return numbers


def _in_fresh_process(way: str, calls: int, workers: int) -> Dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--one", way, str(calls), str(workers)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated, of " + ", ".join(WAYS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--one", nargs=3, metavar=("WAY", "CALLS", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]))))
        return 0
    rows: List[Dict[str, Any]] = []
    for calls in (int(size) for size in args.sizes.split(",")):
        for way in args.ways.split(","):
            print(f"measuring {way} x {calls:,} ...", file=sys.stderr, flush=True)
            numbers = _in_fresh_process(way, calls, args.workers)
            rows.append({"way": way, "calls": calls, **numbers})
    width = max(len(row["way"]) for row in rows)
    print(f"{'calls':>10}  {'way':<{width}}  {'µs/call':>8}  {'bytes/call':>10}")
    for row in rows:
        per_call = row["seconds"] / row["calls"] * 1e6
        print(f"{row['calls']:>10,}  {row['way']:<{width}}  {per_call:>8.2f}  "
              f"{row['growth_bytes'] / row['calls']:>10,.0f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"workers": args.workers, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
