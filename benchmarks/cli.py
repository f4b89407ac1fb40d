"""``python -m benchmarks``: the command line."""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

from benchmarks.clusters import quiet_engines
from benchmarks.engines import EngineSettings
from benchmarks.families import FAMILIES, has_batch_size
from benchmarks.sessions import LONG_REPEATS, Config, plan_sessions
from benchmarks.workloads import WORKLOAD_GROUPS, WORKLOADS

#: The workload measured apart, in benchmarks/large.py.
LARGE = "large"

__all__ = ["main", "parse_args"]

DEFAULT_OUTPUT = pathlib.Path("benchmark-results")

#: Full runs: a batch aims at about this many seconds of work (the tiny workload's
#: batches make their fixed number of calls however long it takes), and fails after
#: the timeout.
FULL_BATCH_SECONDS, FULL_BATCH_TIMEOUT = 0.5, 120.0
QUICK_BATCH_SECONDS, QUICK_BATCH_TIMEOUT = 0.1, 60.0
QUICK_REPEATS = 1


def _names(kind: str, known: Sequence[str], groups: Optional[Dict[str, Sequence[str]]] = None):
    groups = groups or {}

    def parse(text: str) -> List[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known and name not in groups]
        if unknown or not names:
            choices = ", ".join([*known, *groups])
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"choose from {choices} (comma-separated)"
            )
        chosen = {n for name in names for n in groups.get(name, (name,))}
        return [name for name in known if name in chosen]

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's options (see ``python -m benchmarks --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Measure calls per second of every taskrunners runner, through the blocking "
            "twin (taskrunners.sync) and the async facade (taskrunners), side by side with "
            "the raw engine under it, and write a table, a JSON file and a chart."
        ),
        epilog=(
            f"workloads: {', '.join(f'{w.name} ({w.description})' for w in WORKLOADS.values())}; "
            f"'classic' stands for {','.join(WORKLOAD_GROUPS['classic'])} and 'sweep' for "
            "every sweep point. Each runner's engines are open together and take turns, one "
            "batch each per round. Prefect 3's matching runners are added as extra columns "
            "when prefect is importable (tox -e bench-peers)."
        ),
    )
    parser.add_argument(
        "--workloads", type=_names("workload", [*WORKLOADS, LARGE], WORKLOAD_GROUPS),
        default=[*WORKLOADS, LARGE], metavar="NAMES",
        help=f"comma-separated, of {','.join([*WORKLOAD_GROUPS, *WORKLOADS, LARGE])} (default: "
        f"all; {LARGE}: calls sharing one large array, see benchmarks/large.py)",
    )
    parser.add_argument(
        "--runners", type=_names("runner", list(FAMILIES)), default=list(FAMILIES),
        metavar="NAMES", help=f"comma-separated, of {','.join(FAMILIES)} (default: all)",
    )
    parser.add_argument(
        "--repeats", type=_positive, default=None, metavar="N",
        help=f"timed rounds per workload; each cell is the median of its batches (default: 5, "
        f"or {QUICK_REPEATS} with --quick; tiny and the sweep points use at most "
        f"{LONG_REPEATS})",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="small batches and one round: proves the harness works in about a minute",
    )
    parser.add_argument(
        "--output", type=pathlib.Path, default=DEFAULT_OUTPUT, metavar="DIR",
        help=f"where results.json, results.png and crossover.png go (default: ./{DEFAULT_OUTPUT}/)",
    )
    parser.add_argument(
        "--no-peers", action="store_true",
        help="leave out Prefect's runners even when prefect is importable",
    )
    parser.add_argument(
        "--markdown", action="store_true",
        help="print the tables as Markdown (for the README) instead of terminal tables",
    )
    parser.add_argument(
        "--from-json", type=pathlib.Path, default=None, metavar="FILE",
        help="measure nothing: print the tables of a results.json and redraw its charts "
        "into --output",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 5
    return args


def _load_average() -> Optional[List[float]]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _time_spin(iterations: int) -> float:
    from benchmarks.workloads import spin

    best = float("inf")
    for _ in range(3):
        begun = time.perf_counter()
        spin(iterations)
        best = min(best, time.perf_counter() - begun)
    return best


def _batch_size_parameter(families: Sequence[str]) -> Dict[str, Dict[str, bool]]:
    """Which batching runners take ``batch_size`` yet, as blocking twin and as facade."""
    import taskrunners
    import taskrunners.sync

    return {
        key: {
            "taskrunners.sync": has_batch_size(getattr(taskrunners.sync, FAMILIES[key].runner_class)),
            "taskrunners": has_batch_size(getattr(taskrunners, FAMILIES[key].runner_class)),
        }
        for key in families if FAMILIES[key].batching
    }


def prefect_importable() -> bool:
    return importlib.util.find_spec("prefect") is not None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks; 0 when every measured cell succeeded, 1 if any failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from benchmarks import charts
    from benchmarks.results import load_json
    from benchmarks.tables import default_console

    console = default_console()
    if args.from_json is not None:
        results = load_json(args.from_json)
        _print_tables(results, console, args.markdown)
        args.output.mkdir(parents=True, exist_ok=True)
        written = charts.write_charts(results, args.output)
        console.print(f"wrote {' and '.join(map(str, written)) or 'no chart'}")
        return 0

    environment = quiet_engines()
    command = " ".join(["python -m benchmarks", *argv])
    results, interrupted = measure(args, console, environment, command)
    _print_tables(results, console, args.markdown)
    written = charts.chart_and_json(results, args.output)
    if LARGE in args.workloads and not interrupted:
        written.append(_measure_large(args, console))
    console.print(f"wrote {', '.join(map(str, written))}")
    if interrupted:
        return 130
    if results.failures:
        console.print(
            f"[red]{len(results.failures)} cell(s) failed:[/] "
            + "; ".join(f"{c.family} {c.mode} {c.workload}: {c.note}" for c in results.failures)
        )
        return 1
    return 0


def _measure_large(args: argparse.Namespace, console) -> pathlib.Path:
    """The ``large`` workload (benchmarks/large.py): its table printed, its rounds saved."""
    import json

    from benchmarks.large import LargeConfig, run_large, summary

    with console.status("large: calls sharing one large array, each runner beside its idiom"):
        result = run_large(LargeConfig(quick=args.quick), args.runners)
    console.print("\n".join(summary(result)))
    path = args.output / "large.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def _print_tables(results, console, markdown: bool) -> None:
    from benchmarks.tables import markdown_tables, render_tables

    if markdown:
        print(markdown_tables(results))
    else:
        render_tables(results, console)


def measure(args: argparse.Namespace, console, environment, command: str):
    """Calibrate, plan and run the sessions under a progress bar; returns (results, interrupted)."""
    import loky
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
    )

    from benchmarks.machine import machine_info
    from benchmarks.measure import run_sessions
    from benchmarks.results import Results
    from benchmarks.workloads import CPU_SECONDS, calibrate_spin, cpu

    started = time.perf_counter()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = _load_average()
    workers = loky.cpu_count()
    spin_iterations, spin_seconds = (0, 0.0)
    if any(WORKLOADS[name].run_fn is cpu for name in args.workloads):
        with console.status("calibrating the cpu work (20 ms of pure-Python arithmetic)"):
            spin_iterations, spin_seconds = calibrate_spin(CPU_SECONDS)
    peers = not args.no_peers and prefect_importable()
    config = Config(
        workloads=tuple(name for name in args.workloads if name in WORKLOADS),
        families=tuple(key for key in FAMILIES if key in args.runners),
        repeats=args.repeats,
        quick=args.quick,
        batch_seconds=QUICK_BATCH_SECONDS if args.quick else FULL_BATCH_SECONDS,
        batch_timeout=QUICK_BATCH_TIMEOUT if args.quick else FULL_BATCH_TIMEOUT,
        warmup_calls=max(4, 2 * workers),
        spin_iterations=spin_iterations,
        spin_seconds=spin_seconds,
        engine_settings=EngineSettings(workers=workers),
        peers=peers,
    )
    sessions = plan_sessions(config)
    interrupted = False
    with Progress(
        TextColumn("{task.description}", style="cyan"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task("starting", total=sum(s.units for s in sessions))

        def progress(text: str, units: int) -> None:
            if text:
                bar.update(task, description=text)
            if units:
                bar.advance(task, units)

        try:
            run_sessions(sessions, progress, origin=started)
        except KeyboardInterrupt:
            interrupted = True
        bar.update(task, description="interrupted" if interrupted else "done")
    if peers:
        from benchmarks.peers import applied

        environment = {**environment, **applied}
    machine = machine_info(workers)
    # How busy the machine was: other processes make every number noisier.
    machine["load_average_before"] = load_before
    machine["load_average_after"] = _load_average()
    run_config = config.as_dict()
    run_config["batch_size_parameter"] = _batch_size_parameter(config.families)
    if spin_iterations:
        # The same 20 ms of work timed again: a drift shows the machine's speed changed.
        run_config["cpu_spin_seconds_after"] = _time_spin(spin_iterations)
    results = Results(
        config=run_config,
        machine=machine,
        cells=[cell for s in sessions for cell in s.cells],
        sessions=[record for s in sessions for record in s.records],
        created=created,
        elapsed_seconds=time.perf_counter() - started,
        command=command,
        environment=environment,
        interrupted=interrupted,
    )
    return results, interrupted
