"""The ``large`` workload: many calls sharing one large array, each runner beside its engine's idiom.

N calls each take the same M MB float64 array. Two points: each call sums the array
(the cost of moving it dominates), and each call does about 50 ms of arithmetic on
parts of it that stay in the CPU's cache (where parallel starts paying: summing the
whole array again and again would only share the memory's bandwidth). One runner at a time, rounds run its contenders and a
plain loop one after the other (interleaved), so that the machine's noise falls on
all of them alike:

- a plain loop in this process;
- the Parallel runner (blocking twin, ``submit`` then ``wait``), a flow's
  ``task.map(unmapped(array), ...)`` on it (timed inside the flow: its pool start
  is not counted), and ``joblib.Parallel(n_jobs=2)``, which memmaps arrays over 1 MB;
- the Dask runner and ``client.scatter`` then ``client.submit``, on one cluster of 2
  worker processes;
- the Ray runner and ``ray.put`` then ``f.remote(ref)``, on one local Ray of 2 CPUs.

Run alone with ``python -m benchmarks.large [--quick] [--json FILE]``; ``python -m
benchmarks`` runs it as its ``large`` workload.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from benchmarks.clusters import local_cluster

__all__ = ["LargeConfig", "run_large", "main"]


class LargeConfig:
    """Sizes: ``calls`` calls sharing an array of ``megabytes`` MB, ``rounds`` rounds."""

    def __init__(self, quick: bool = False, rounds: Optional[int] = None) -> None:
        self.calls = 16
        self.megabytes = 8 if quick else 80
        self.rounds = rounds or (2 if quick else 3)
        self.work_seconds = 0.05
        self.workers = 2


def total(array: Any) -> float:
    return float(array.sum())


def worked(array: Any, repeats: int) -> float:
    """About 50 ms of work on ``array`` (``repeats`` is calibrated): arithmetic on
    slices that stay in the CPU's cache, so that two workers do not just share the
    memory's bandwidth, as summing the whole array would.

    Into one buffer, with no temporary per step: Dask's workers run with
    ``MALLOC_TRIM_THRESHOLD_=65536``, under which each 256 KB temporary is a fresh
    ``mmap`` and its page faults, several times the arithmetic's own cost.
    """
    import numpy as np

    step = 32_768
    buffer = np.empty(step)
    result = 0.0
    for index in range(repeats):
        start = (index % 8) * step % max(1, array.size - step)
        np.sqrt(array[start : start + step], out=buffer)
        result += float(buffer.sum())
    return result


def total_state(array: Any) -> Any:
    from taskrunners.states import Completed

    return Completed(data=total(array))


def worked_state(array: Any, repeats: int) -> Any:
    from taskrunners.states import Completed

    return Completed(data=worked(array, repeats))


def _calibrate(array: Any, seconds: float) -> int:
    worked(array, 50)
    begun = time.perf_counter()
    worked(array, 200)
    per = (time.perf_counter() - begun) / 200
    return max(1, round(seconds / per))


def run_large(config: LargeConfig, runners: Sequence[str] = ("parallel", "dask", "ray")) -> Dict[str, Any]:
    """Measure every contender; the seconds of each round, by point and contender.

    One runner at a time, with its engine's idiom and a plain loop: on 2 cores the
    idle processes of the other engines (Ray's, Dask's) would slow every contender.
    """
    import numpy as np

    array = np.random.default_rng(0).random(config.megabytes * 2**20 // 8)
    repeats = _calibrate(array, config.work_seconds)
    points = {"sum": ({}, total, total_state), "work": ({"repeats": repeats}, worked, worked_state)}
    n = config.calls
    seconds: Dict[str, Dict[str, List[float]]] = {point: {} for point in points}

    def plain(extra: Dict[str, Any], fn: Callable[..., Any], state_fn: Callable[..., Any]) -> float:
        begun = time.perf_counter()
        [fn(array, **extra) for _ in range(n)]
        return time.perf_counter() - begun

    phases = [("parallel", _parallel), ("dask", _dask), ("ray", _ray)]
    engines = {"parallel": "joblib", "dask": "distributed", "ray": "ray"}
    for key, open_phase in phases:
        if key not in runners or importlib.util.find_spec(engines[key]) is None:
            continue
        contenders: Dict[str, Callable[[Dict[str, Any], Any, Any], float]] = {"plain loop": plain}
        closers: List[Callable[[], None]] = []
        try:
            open_phase(contenders, closers, array, config)
            for point, (extra, fn, state_fn) in points.items():
                for contender in contenders.values():  # warm up
                    contender(extra, fn, state_fn)
                for _ in range(config.rounds):
                    for name, contender in contenders.items():
                        seconds[point].setdefault(name, []).append(contender(extra, fn, state_fn))
        finally:
            for close in reversed(closers):
                close()
    return {
        "calls": n,
        "megabytes": config.megabytes,
        "work_repeats": repeats,
        "rounds": config.rounds,
        "seconds": seconds,
    }


def _twin(runner: Any, array: Any, n: int) -> Callable[[Dict[str, Any], Any, Any], float]:
    """A started blocking twin: ``n`` calls submitted, then waited for."""
    import taskrunners

    def twin(extra: Dict[str, Any], fn: Any, state_fn: Any) -> float:
        begun = time.perf_counter()
        futures = [runner.submit(taskrunners.TaskRun(), state_fn, {"array": array, **extra}) for _ in range(n)]
        for future in futures:
            runner.wait(future).result()
        return time.perf_counter() - begun

    return twin


def _parallel(contenders: Dict[str, Any], closers: List[Any], array: Any, config: LargeConfig) -> None:
    import joblib

    from taskrunners import flow, task, unmapped
    from taskrunners.sync import ParallelTaskRunner
    from taskrunners.task_runners import ParallelTaskRunner as FacadeParallel

    n = config.calls
    runner = ParallelTaskRunner(max_workers=config.workers)
    block = runner.start()
    block.__enter__()
    closers.append(lambda: block.__exit__(None, None, None))

    def with_joblib(extra: Dict[str, Any], fn: Any, state_fn: Any) -> float:
        begun = time.perf_counter()
        joblib.Parallel(n_jobs=config.workers)(joblib.delayed(fn)(array, **extra) for _ in range(n))
        return time.perf_counter() - begun

    @task
    def mapped_task(array: Any, index: int, extra: Dict[str, Any], fn: Any) -> float:
        return float(fn(array, **extra))

    def flow_map(extra: Dict[str, Any], fn: Any, state_fn: Any) -> float:
        @flow(task_runner=FacadeParallel(max_workers=config.workers))
        def timed() -> float:
            # The workers' first call (imports) is not timed, as joblib's are warm.
            mapped_task.map(unmapped(array[:1]), range(2), unmapped(extra), unmapped(fn))[0].result()
            begun = time.perf_counter()
            futures = mapped_task.map(unmapped(array), range(n), unmapped(extra), unmapped(fn))
            [future.result() for future in futures]
            return time.perf_counter() - begun

        return float(timed().result())

    contenders["Parallel twin"] = _twin(runner, array, n)
    contenders["Parallel flow task.map"] = flow_map
    contenders["joblib.Parallel"] = with_joblib


def _dask(contenders: Dict[str, Any], closers: List[Any], array: Any, config: LargeConfig) -> None:
    import distributed

    from taskrunners.sync import DaskTaskRunner

    n = config.calls
    cluster = local_cluster(
        n_workers=config.workers, threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None,
    )
    closers.append(cluster.close)
    client = distributed.Client(cluster)
    closers.append(client.close)
    runner = DaskTaskRunner(address=cluster.scheduler_address)
    block = runner.start()
    block.__enter__()
    closers.append(lambda: block.__exit__(None, None, None))

    def scatter_submit(extra: Dict[str, Any], fn: Any, state_fn: Any) -> float:
        begun = time.perf_counter()
        scattered = client.scatter(array)
        futures = [client.submit(fn, scattered, pure=False, **extra) for _ in range(n)]
        client.gather(futures)
        return time.perf_counter() - begun

    contenders["Dask twin"] = _twin(runner, array, n)
    contenders["Dask scatter+submit"] = scatter_submit


def _ray(contenders: Dict[str, Any], closers: List[Any], array: Any, config: LargeConfig) -> None:
    import ray

    from taskrunners.sync import RayTaskRunner

    n = config.calls
    ray.init(num_cpus=config.workers, include_dashboard=False, logging_level="ERROR")
    closers.append(ray.shutdown)
    runner = RayTaskRunner()  # joins the instance started above
    block = runner.start()
    block.__enter__()
    closers.append(lambda: block.__exit__(None, None, None))
    remotes: Dict[Any, Any] = {}

    def put_remote(extra: Dict[str, Any], fn: Any, state_fn: Any) -> float:
        remote = remotes.get(fn) or remotes.setdefault(fn, ray.remote(fn))
        begun = time.perf_counter()
        ref = ray.put(array)
        ray.get([remote.remote(ref, **extra) for _ in range(n)])
        return time.perf_counter() - begun

    contenders["Ray twin"] = _twin(runner, array, n)
    contenders["Ray put+remote"] = put_remote


#: Each runner's row, its idiom's row.
PAIRS = (
    ("Parallel twin", "joblib.Parallel"),
    ("Parallel flow task.map", "joblib.Parallel"),
    ("Dask twin", "Dask scatter+submit"),
    ("Ray twin", "Ray put+remote"),
)


def summary(result: Dict[str, Any]) -> List[str]:
    """Lines of a table: best and median seconds, the ratio to the idiom and to the loop."""
    lines = [
        f"large: {result['calls']} calls sharing one {result['megabytes']} MB array, "
        f"best of {result['rounds']} interleaved rounds"
    ]
    for point, by_name in result["seconds"].items():
        loop = min(by_name["plain loop"])
        lines.append(f"  {point}: plain loop {loop:.3f} s")
        for name, idiom in PAIRS:
            if name not in by_name or idiom not in by_name:
                continue
            best, peer = min(by_name[name]), min(by_name[idiom])
            median = statistics.median(by_name[name])
            lines.append(
                f"    {name:<24} {best:7.3f} s (median {median:.3f})  {idiom} {peer:.3f} s  "
                f"= {best / peer:5.2f}x the idiom, {loop / best:5.2f}x faster than the loop"
            )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="an 8 MB array, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--runners", default="parallel,dask,ray")
    parser.add_argument("--json", default=None, help="write the seconds of every round here")
    args = parser.parse_args(argv)
    result = run_large(LargeConfig(args.quick, args.rounds), args.runners.split(","))
    print("\n".join(summary(result)))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
