"""``python -m benchmarks.goals``: the numbers batching promises, in one run.

For the Parallel, Dask and Ray runners on 2 workers, each measured against its raw
engine and its bulk peer (``joblib.Parallel``, ``dask.bag`` map, Ray's ``Pool.map``)
with the engines of one runner taking turns, median of ``--repeats`` rounds:

- ``tiny``: 10,000 no-op calls with ``batch_size="auto"`` and through
  ``RunnerExecutor.map``, against the peer; and the
  cost of one call with ``batch_size=1`` against the raw engine and against "auto"
  (measured on fewer calls: 2,000, or 500 on Dask, where one call costs milliseconds);
- ``cpu``: 200 calls of 20 ms of pure-Python work, "auto" and 1 against a plain loop;
- ``latency``: one call alone, submit to State, "auto" against 1 (median of 30);
- ``flow map`` (Parallel): ``task.map`` over 10,000 items inside a flow, timed from
  the map to the last result once a first map has started the workers (the whole
  flow, the pool's start included, is shown apart), against joblib on the same calls.

Prints one table of medians and ratios; ``--json PATH`` also writes them. A million
calls, and memory per call, are measured apart: ``python -m benchmarks.scale``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks.bulk import JoblibMap, bulk_engine
from benchmarks.clusters import SharedCluster, quiet_engines
from benchmarks.engines import EngineSettings, SyncEngine
from benchmarks.families import FAMILIES
from benchmarks.workloads import calibrate_spin, cpu, noop

__all__ = ["main"]

TINY_CALLS = 10_000
#: Calls per round with batch_size=1 and on the raw engine (one engine task per call).
SINGLE_CALLS = {"parallel": 2000, "dask": 500, "ray": 2000}
CPU_CALLS = 200
LATENCY_CALLS = 30


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _take_turns(runs: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median seconds of each run, the runs taking turns (A, B, C, A, B, C, ...)."""
    for run in runs.values():  # warm-up: pools started, functions shipped
        run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_seconds(run))
    return {name: statistics.median(values) for name, values in times.items()}


def _latency(engine: SyncEngine) -> float:
    """Median seconds of one call alone, submit to State, on an idle engine."""
    results = []
    for _ in range(LATENCY_CALLS):
        results.append(_seconds(lambda: engine.run_batch(noop, {}, 1, 60.0)))
    return statistics.median(results)


def _measure_family(key: str, settings: EngineSettings, iterations: int, repeats: int) -> Dict[str, float]:
    family = FAMILIES[key]
    shared = SharedCluster(key, settings) if family.shares_cluster else None
    if shared is not None:
        shared.open()
    engines = {mode: family.engine(mode, settings, shared) for mode in ("raw", "twin", "auto", "map")}
    engines["bulk"] = bulk_engine(family, settings, shared)
    opened: List[SyncEngine] = []
    try:
        for engine in engines.values():
            engine.open()
            opened.append(engine)
        raw, one, auto, mapped, bulk = (engines[m] for m in ("raw", "twin", "auto", "map", "bulk"))
        single = SINGLE_CALLS[key]
        tiny = _take_turns(
            {
                "auto": lambda: auto.run_batch(noop, {}, TINY_CALLS, 600.0),
                "map": lambda: mapped.run_batch(noop, {}, TINY_CALLS, 600.0),
                "bulk": lambda: bulk.run_batch(noop, {}, TINY_CALLS, 600.0),
                "auto-short": lambda: auto.run_batch(noop, {}, single, 600.0),
                "one": lambda: one.run_batch(noop, {}, single, 600.0),
                "raw": lambda: raw.run_batch(noop, {}, single, 600.0),
            },
            repeats,
        )
        work = {"iterations": iterations}
        cpu_times = _take_turns(
            {
                "cpu-auto": lambda: auto.run_batch(cpu, work, CPU_CALLS, 600.0),
                "cpu-one": lambda: one.run_batch(cpu, work, CPU_CALLS, 600.0),
            },
            repeats,
        )
        return {
            "tiny auto / bulk": tiny["auto"] / tiny["bulk"],
            "tiny auto µs/call": tiny["auto"] / TINY_CALLS * 1e6,
            "tiny executor map / bulk": tiny["map"] / tiny["bulk"],
            "tiny executor map µs/call": tiny["map"] / TINY_CALLS * 1e6,
            "tiny bulk µs/call": tiny["bulk"] / TINY_CALLS * 1e6,
            "batch_size=1 µs/call": tiny["one"] / single * 1e6,
            "raw µs/call": tiny["raw"] / single * 1e6,
            "batch_size=1 / raw": tiny["one"] / tiny["raw"],
            "batch_size=1 / auto (per call)": tiny["one"] / tiny["auto-short"],
            "cpu auto s": cpu_times["cpu-auto"],
            "cpu batch_size=1 s": cpu_times["cpu-one"],
            "cpu auto / batch_size=1": cpu_times["cpu-auto"] / cpu_times["cpu-one"],
            "latency auto ms": _latency(auto) * 1e3,
            "latency batch_size=1 ms": _latency(one) * 1e3,
        }
    finally:
        for engine in reversed(opened):
            engine.close()
        if shared is not None:
            shared.close()


def _flow_map(workers: int, repeats: int) -> Dict[str, float]:
    """``task.map`` over 10,000 items in a flow on Parallel, against joblib."""
    joblib = JoblibMap(workers)
    inside: List[float] = []
    whole: List[float] = []
    peer: List[float] = []
    map_in_flow(workers, 100)  # warm-up
    joblib.run_batch(noop, {}, 100, 60.0)
    for _ in range(repeats):
        started = time.perf_counter()
        inside.append(map_in_flow(workers, TINY_CALLS))
        whole.append(time.perf_counter() - started)
        peer.append(_seconds(lambda: joblib.run_batch(noop, {}, TINY_CALLS, 600.0)))
    joblib.close()
    return {
        "flow map µs/task": statistics.median(inside) / TINY_CALLS * 1e6,
        "flow map / joblib": statistics.median(inside) / statistics.median(peer),
        "whole flow (pool start included) / joblib": statistics.median(whole)
        / statistics.median(peer),
    }


def map_in_flow(workers: int, items: int) -> float:
    """Run a flow on Parallel that maps a no-op task over ``items``; seconds from the
    map to the last result, after a first map of 100 items has started the workers."""
    from taskrunners import ParallelTaskRunner, flow, task

    @task
    def nothing(item: int) -> None:
        return None

    @flow(task_runner=ParallelTaskRunner(max_workers=workers))
    def mapped() -> float:
        for future in nothing.map(range(100)):  # the pool's workers start here
            future.result()
        started = time.perf_counter()
        futures = nothing.map(range(items))
        for future in futures:
            future.result()
        return time.perf_counter() - started

    return mapped().result()


def _sequential_cpu(iterations: int, repeats: int) -> float:
    def loop() -> None:
        for _ in range(CPU_CALLS):
            cpu(iterations)

    return _take_turns({"loop": loop}, repeats)["loop"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.goals", description=__doc__.split("\n")[0])
    parser.add_argument("--runners", default="parallel,dask,ray")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    quiet_engines()
    settings = EngineSettings(args.workers)
    iterations, _ = calibrate_spin(0.02)
    results: Dict[str, Dict[str, float]] = {}
    plain = _sequential_cpu(iterations, args.repeats)
    for key in args.runners.split(","):
        print(f"measuring {key} ...", file=sys.stderr, flush=True)
        numbers = _measure_family(key, settings, iterations, args.repeats)
        numbers["cpu speedup over a plain loop (auto)"] = plain / numbers["cpu auto s"]
        numbers["cpu speedup over a plain loop (batch_size=1)"] = plain / numbers["cpu batch_size=1 s"]
        if key == "parallel":
            numbers.update(_flow_map(args.workers, args.repeats))
        results[key] = numbers
    rows: List[Tuple[str, str, str]] = []
    for key, numbers in results.items():
        rows.extend((key, name, f"{value:,.3g}") for name, value in numbers.items())
    width = max(len(name) for _, name, _ in rows)
    for key, name, value in rows:
        print(f"{key:<9} {name:<{width}} {value:>10}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"workers": args.workers, "repeats": args.repeats, "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
