"""What one run measured: the cells and the engines' start-up records, the
:class:`Results` that hold them (with the ratios between cells and the noise rule),
and the JSON file they are kept in."""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from benchmarks.families import FAMILIES
from benchmarks.workloads import WORKLOADS

__all__ = [
    "MODES", "MODE_TITLES", "Cell", "SessionRecord", "Results", "load_json", "write_json",
    "run_families", "run_workloads", "RATIO_METHOD", "NOISE_RULE", "FORMAT",
]

#: Every mode, in the order columns are shown (see ``workloads.MODES_OF_KIND``).
MODES = ("raw", "twin", "facade", "auto", "map", "bulk", "prefect")

MODE_TITLES = {"raw": "raw engine", "twin": "blocking twin", "facade": "async facade",
                "auto": 'twin, batch_size="auto"',
                "map": "RunnerExecutor.map", "bulk": "bulk peer", "prefect": "Prefect 3",
                "cluster": "shared cluster"}

FORMAT = "taskrunners-benchmarks/2"
#: Older files that --from-json still reads (one engine per session, ratios of medians).
_READABLE = ("taskrunners-benchmarks/1", FORMAT)

RATIO_METHOD = (
    "time per call of one cell divided by another's: the median over rounds of the "
    "ratio within each round, for cells of one session (their engines took turns, "
    "one batch each per round); else the ratio of the two medians"
)

#: A rate or a ratio is marked noisy ("~") when it rests on fewer rounds or calls than
#: these, or when its rounds disagree: the upper quartile of the per-round values is
#: over NOISY_SPREAD times the lower (for a ratio of one session, of the per-round ratios).
MIN_ROUNDS, MIN_CALLS, NOISY_SPREAD = 3, 10, 1.5

NOISE_RULE = (
    f"~ marks a noisy rate or ratio: from fewer than {MIN_ROUNDS} rounds, from fewer than "
    f"{MIN_CALLS} calls in all rounds together, or with rounds that disagree (the upper "
    f"quartile of the per-round values over {NOISY_SPREAD:g} times the lower)"
)


@dataclass
class Cell:
    """One workload on one runner in one mode: the timed batches and their median.

    :param session: the session the cell ran in; cells of one session took turns,
        and their ``seconds`` line up round by round
    :param started: when each timed batch began, in seconds since the run started
    :param batch_size: the runner's ``batch_size`` ("1" or "auto"); None for the others
    """

    workload: str
    family: str
    mode: str
    engine: str = ""
    calls: int = 0
    status: str = "pending"  # ok, failed, skipped, not run
    note: str = ""
    batch_size: Optional[str] = None
    session: int = -1
    warmup_calls: int = 0
    warmup_seconds: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    started: List[float] = field(default_factory=list)

    @property
    def median_seconds(self) -> Optional[float]:
        if self.status != "ok" or not self.seconds:
            return None
        return statistics.median(self.seconds)

    @property
    def calls_per_second(self) -> Optional[float]:
        median = self.median_seconds
        if not median:
            return None
        return self.calls / median

    def as_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["median_seconds"] = self.median_seconds
        data["calls_per_second"] = self.calls_per_second
        return data


@dataclass
class SessionRecord:
    """How one engine (or a shared cluster, mode "cluster") started and stopped."""

    family: str
    mode: str
    engine: str = ""
    workloads: List[str] = field(default_factory=list)
    status: str = "pending"  # ok, failed, skipped, not run
    note: str = ""
    startup_seconds: Optional[float] = None
    first_result_seconds: Optional[float] = None
    shutdown_seconds: Optional[float] = None
    session: int = -1

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Results:
    """Everything one run measured, and where it ran."""

    config: Dict[str, Any]
    machine: Dict[str, Any]
    cells: List[Cell]
    sessions: List[SessionRecord]
    created: str
    elapsed_seconds: float = 0.0
    command: str = ""
    environment: Dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    def cell(self, workload: str, family: str, mode: str) -> Optional[Cell]:
        for cell in self.cells:
            if (cell.workload, cell.family, cell.mode) == (workload, family, mode):
                return cell
        return None

    def time_ratio(self, cell: Optional[Cell], reference: Optional[Cell]) -> Optional[float]:
        """Time per call of ``cell`` divided by that of ``reference`` (see RATIO_METHOD).

        Above 1: ``cell`` is slower. Cells of one session are compared round by round:
        their batches ran back to back, under the same load.
        """
        if cell is None or reference is None or cell is reference:
            return None
        mine, theirs = cell.calls_per_second, reference.calls_per_second
        if not mine or not theirs:
            return None
        paired = _round_ratios(cell, reference)
        if paired:
            return statistics.median(paired)
        return theirs / mine

    def noise(self, cell: Optional[Cell], reference: Optional[Cell]) -> Optional[str]:
        """Why the :meth:`time_ratio` of ``cell`` to ``reference`` is noisy (see
        NOISE_RULE), e.g. "4 calls × 1 round"; None when it is not, or there is none."""
        if cell is None or reference is None or cell is reference:
            return None
        return _noise([cell, reference], _round_ratios(cell, reference))

    def rate_noise(self, cell: Optional[Cell]) -> Optional[str]:
        """Why the calls per second of ``cell`` are noisy (see NOISE_RULE); None when not."""
        return None if cell is None else _noise([cell], [])

    def overhead(self, cell: Cell, against: str) -> Optional[float]:
        """:meth:`time_ratio` of ``cell`` against the same workload in ``against`` mode.

        For ``against="raw"``: the runner's overhead over its raw engine.
        """
        return self.time_ratio(cell, self.cell(cell.workload, cell.family, against))

    @property
    def failures(self) -> List[Cell]:
        return [cell for cell in self.cells if cell.status == "failed"]

    def as_dict(self) -> Dict[str, Any]:
        cells = []
        for cell in self.cells:
            data = cell.as_dict()
            data["ratios"] = {
                f"vs_{mode}": value for mode in MODES if mode != cell.mode
                for value in [self.overhead(cell, mode)] if value is not None
            }
            data["noisy"] = {
                key: reason for key, reason in [("rate", self.rate_noise(cell))] + [
                    (f"vs_{mode}", self.noise(cell, self.cell(cell.workload, cell.family, mode)))
                    for mode in MODES if mode != cell.mode
                ] if reason
            }
            if cell.mode in ("twin", "facade"):
                data["overhead_vs_raw"] = self.overhead(cell, "raw")
                data["overhead_vs_prefect"] = self.overhead(cell, "prefect")
            cells.append(data)
        spin_iterations = self.config.get("cpu_spin_iterations") or 0
        return {
            "format": FORMAT,
            "created": self.created,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "interrupted": self.interrupted,
            "command": self.command,
            "machine": self.machine,
            "config": self.config,
            "environment": self.environment,
            "ratio_method": RATIO_METHOD,
            "noise_rule": NOISE_RULE,
            "modes": {mode: MODE_TITLES[mode] for mode in MODES},
            "workloads": {
                name: {
                    "description": w.description,
                    "kind": w.kind,
                    "modes": list(w.modes),
                    "default_calls": w.calls,
                    "quick_calls": w.quick_calls,
                    "seconds_per_call": w.seconds_per_call,
                    "run_fn": w.run_fn.__name__,
                    "kwargs": w.kwargs(spin_iterations),
                    "coroutine": w.is_async,
                }
                for name, w in WORKLOADS.items()
                if name in self.config.get("workloads", ())
            },
            "sessions": [record.as_dict() for record in self.sessions],
            "cells": cells,
        }


def _round_ratios(cell: Cell, reference: Cell) -> List[float]:
    """Time per call of ``cell`` over ``reference``'s, round by round; [] unless the two
    took turns in one session."""
    if cell.session < 0 or cell.session != reference.session:
        return []
    return [
        (a / cell.calls) / (b / reference.calls)
        for a, b in zip(cell.seconds, reference.seconds) if a > 0 and b > 0
    ]


def _noise(cells: List[Cell], paired: List[float]) -> Optional[str]:
    if any(not c.calls_per_second for c in cells):
        return None
    rounds = min(len(c.seconds) for c in cells)
    calls = min(c.calls for c in cells)
    reasons = []
    if rounds < MIN_ROUNDS or calls * rounds < MIN_CALLS:
        reasons.append(f"{calls:,} calls × {rounds} round{'s' if rounds != 1 else ''}")
    # Paired rounds cancel the load both cells shared; else each cell's rounds count.
    rounds_of = [paired] if paired else [[s / c.calls for s in c.seconds] for c in cells]
    if math.prod(_spread(values) for values in rounds_of) > NOISY_SPREAD:
        apart = math.prod(max(v) / min(v) if min(v) > 0 else math.inf for v in rounds_of)
        reasons.append(f"rounds up to {apart:.2g}× apart")
    return ", ".join(reasons) or None


def _spread(values: List[float]) -> float:
    """Upper quartile over lower quartile: how far apart the middle rounds are."""
    if len(values) < 2:
        return 1.0
    lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
    return upper / lower if lower > 0 else math.inf


def run_families(results: Results) -> List[str]:
    chosen = results.config.get("runners") or list(FAMILIES)
    return [key for key in FAMILIES if key in chosen]


def run_workloads(results: Results, kinds: tuple = ("classic", "tiny", "sweep")) -> List[str]:
    """The workloads of the run, of the given kinds (unknown names count as classic)."""
    names = list(results.config.get("workloads") or WORKLOADS)
    return [n for n in names if (WORKLOADS[n].kind if n in WORKLOADS else "classic") in kinds]


def load_json(path: pathlib.Path) -> Results:
    """Read results written by :func:`write_json` (to redraw tables and chart)."""
    data = json.loads(pathlib.Path(path).read_text())
    if data.get("format") not in _READABLE:
        raise ValueError(
            f"{path} is not a results file of this harness (format={data.get('format')!r}; "
            f"readable: {', '.join(_READABLE)})."
        )
    cell_fields = set(Cell.__dataclass_fields__)
    record_fields = set(SessionRecord.__dataclass_fields__)
    return Results(
        config=data["config"],
        machine=data["machine"],
        cells=[Cell(**{k: v for k, v in c.items() if k in cell_fields}) for c in data["cells"]],
        sessions=[
            SessionRecord(**{k: v for k, v in s.items() if k in record_fields})
            for s in data["sessions"]
        ],
        created=data["created"],
        elapsed_seconds=data.get("elapsed_seconds", 0.0),
        command=data.get("command", ""),
        environment=data.get("environment", {}),
        interrupted=data.get("interrupted", False),
    )


def write_json(results: Results, path: pathlib.Path) -> None:
    path.write_text(json.dumps(results.as_dict(), indent=1, default=str) + "\n")
