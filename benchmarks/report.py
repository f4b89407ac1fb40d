"""The results: the terminal tables and the JSON file (the charts are in ``charts``)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from benchmarks.engines import FAMILIES
from benchmarks.measure import MODES, Cell, SessionRecord
from benchmarks.workloads import MODES_OF_KIND, WORKLOADS

__all__ = [
    "Results", "machine_info", "machine_line", "render_tables", "markdown_tables", "write_json",
    "load_json", "default_console", "run_families", "run_workloads", "repeats_text",
    "RATIO_METHOD", "NOISE_RULE", "MODE_TITLES",
]

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

_PACKAGES = (
    "taskrunners", "anyio", "sniffio", "cloudpickle", "loky", "joblib", "dask", "distributed",
    "ray", "rich", "matplotlib", "prefect", "prefect-dask", "prefect-ray",
)

MODE_TITLES = {"raw": "raw engine", "twin": "blocking twin", "facade": "async facade",
                "auto": 'twin, batch_size="auto"', "bulk": "bulk peer", "prefect": "Prefect 3",
                "cluster": "shared cluster"}
CLASSIC_MODES = MODES_OF_KIND["classic"]
SMALL_CALL_MODES = MODES_OF_KIND["sweep"]


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


# -- the machine ------------------------------------------------------------------------------


def machine_info(workers: int) -> Dict[str, Any]:
    """The machine, the interpreter and the package versions of this run."""
    from importlib import metadata

    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "architecture": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": workers,
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": packages,
        "git_commit": _git_commit(),
    }


def _cpu_model() -> Optional[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _git_commit() -> Optional[str]:
    root = pathlib.Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_line(machine: Dict[str, Any]) -> str:
    memory = machine.get("memory_bytes")
    parts = [
        f"{machine.get('usable_cpus')} usable CPUs ({machine.get('cpu_count')} online)",
        machine.get("cpu_model") or "",
        f"{memory / 2**30:.0f} GiB" if memory else "",
        machine.get("platform") or "",
        f"{machine.get('python_implementation', 'Python')} {machine.get('python')}",
    ]
    before, after = machine.get("load_average_before"), machine.get("load_average_after")
    if before and after:
        # Other processes on the machine make every number noisier: say how busy it was.
        parts.append(f"load average {before[0]:.1f} → {after[0]:.1f}")
    return " · ".join(p for p in parts if p)


# -- the tables -------------------------------------------------------------------------------


def _rate(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio(value: Optional[float], noisy: Optional[str] = None) -> str:
    if value is None:
        return "—"
    return ("~" if noisy else "") + (f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×")


def _speedup(overhead: Optional[float], noisy: Optional[str] = None) -> str:
    """An overhead against a peer, said as how many times faster (or slower) we are."""
    if overhead is None:
        return "—"
    mark = "~" if noisy else ""
    if overhead <= 1:
        factor = 1 / overhead
        return mark + (f"{factor:,.0f}× faster" if factor >= 100 else f"{factor:.3g}× faster")
    return f"{mark}{overhead:.3g}× slower"


def _ratio_style(value: Optional[float]) -> str:
    if value is None:
        return "dim"
    if value <= 1.25:
        return "green"
    if value <= 2.0:
        return "yellow"
    return "red"


def run_families(results: Results) -> List[str]:
    chosen = results.config.get("runners") or list(FAMILIES)
    return [key for key in FAMILIES if key in chosen]


def run_workloads(results: Results, kinds: tuple = ("classic", "tiny", "sweep")) -> List[str]:
    """The workloads of the run, of the given kinds (unknown names count as classic)."""
    names = list(results.config.get("workloads") or WORKLOADS)
    return [n for n in names if (WORKLOADS[n].kind if n in WORKLOADS else "classic") in kinds]


def _has_peers(results: Results) -> bool:
    return any(cell.mode == "prefect" for cell in results.cells)


#: Said once under the table instead of on every row.
_NO_BATCH_SIZE = "runner has no batch_size yet"


def _notes(by_mode: Dict[str, Optional[Cell]], said: tuple = ()) -> List[str]:
    """The notes of cells that did not run, each once, naming the modes it applies to;
    except the notes in ``said``."""
    present = [mode for mode, cell in by_mode.items() if cell is not None]
    noted: Dict[str, List[str]] = {}
    for mode in present:
        cell = by_mode[mode]
        if cell.status != "ok" and cell.note and cell.note not in said:
            noted.setdefault(cell.note, []).append(mode)
    return [
        text if modes == present else f"{', '.join(modes)}: {text}"
        for text, modes in noted.items()
    ]


#: The ratio columns of the two tables, as their headers name them.
_RATIO_COLUMNS = {"twin_vs_raw": "twin ×", "facade_vs_raw": "facade ×",
                  "twin_vs_prefect": "twin vs Prefect"}
_SMALL_RATIO_COLUMNS = {"twin_vs_raw": "bs=1 ×", "auto_vs_twin": "auto vs bs=1",
                        "bulk_vs_twin": "peer vs bs=1", "auto_vs_bulk": "auto vs peer"}


def _noise_notes(noisy: Dict[str, str], columns: Dict[str, str]) -> List[str]:
    """One note per reason, naming the columns it marks with ~."""
    by_reason: Dict[str, List[str]] = {}
    for key, title in columns.items():
        if noisy.get(key):
            by_reason.setdefault(noisy[key], []).append(title)
    return [f"~ {', '.join(titles)}: {reason}" for reason, titles in by_reason.items()]


def table_rows(results: Results) -> List[Dict[str, Any]]:
    """The runner-overhead table (classic workloads), one row per workload and runner."""
    rows = []
    for workload in run_workloads(results, ("classic",)):
        for family in run_families(results):
            by_mode = {mode: results.cell(workload, family, mode) for mode in CLASSIC_MODES}
            if not any(by_mode.values()):
                continue
            raw = by_mode["raw"]
            notes = _notes(by_mode)
            peer = by_mode["prefect"]
            if peer is not None and raw is not None and peer.calls != raw.calls:
                notes.append(f"Prefect: {peer.calls} calls a batch")
            row = {
                "workload": workload,
                "runner": FAMILIES[family].title,
                "calls": raw.calls if raw else (by_mode["twin"].calls if by_mode["twin"] else None),
                "raw_engine": raw.engine if raw else "",
                "notes": notes,
            }
            for mode in CLASSIC_MODES:
                cell = by_mode[mode]
                row[f"{mode}_rate"] = cell.calls_per_second if cell else None
                row[f"{mode}_calls"] = cell.calls if cell else None
            row["noisy"] = {}
            for mode in ("twin", "facade"):
                cell = by_mode[mode]
                for against in ("raw", "prefect"):
                    key = f"{mode}_vs_{against}"
                    row[key] = results.overhead(cell, against) if cell else None
                    row["noisy"][key] = results.noise(cell, by_mode[against])
            notes += _noise_notes(row["noisy"], _RATIO_COLUMNS)
            rows.append(row)
    return rows


def small_call_rows(results: Results) -> List[Dict[str, Any]]:
    """The many-small-calls table (tiny and the sweep), one row per workload and runner."""
    rows = []
    for workload in run_workloads(results, ("tiny", "sweep")):
        for family in run_families(results):
            by_mode = {mode: results.cell(workload, family, mode) for mode in SMALL_CALL_MODES}
            if not any(by_mode.values()):
                continue
            raw, twin, auto, bulk = (by_mode[m] for m in SMALL_CALL_MODES)
            one = twin or raw
            batched = auto or bulk
            calls = f"{one.calls:,}" if one else "—"
            if batched is not None and (one is None or batched.calls != one.calls):
                calls = f"{calls} / {batched.calls:,}"
            noisy = {"twin_vs_raw": results.noise(twin, raw),
                     "auto_vs_twin": results.noise(auto, twin),
                     "bulk_vs_twin": results.noise(bulk, twin),
                     "auto_vs_bulk": results.noise(auto, bulk)}
            rows.append({
                "workload": workload,
                "runner": FAMILIES[family].title,
                "calls": calls,
                "raw_rate": raw.calls_per_second if raw else None,
                "twin_rate": twin.calls_per_second if twin else None,
                "twin_vs_raw": results.time_ratio(twin, raw),
                "auto_rate": auto.calls_per_second if auto else None,
                "auto_vs_twin": results.time_ratio(auto, twin),
                "bulk_engine": bulk.engine if bulk else "",
                "bulk_rate": bulk.calls_per_second if bulk else None,
                "bulk_vs_twin": results.time_ratio(bulk, twin),
                "auto_vs_bulk": results.time_ratio(auto, bulk),
                "noisy": noisy,
                "notes": _notes(by_mode, said=(_NO_BATCH_SIZE,))
                + _noise_notes(noisy, _SMALL_RATIO_COLUMNS),
            })
    return rows


def repeats_text(results: Results, key: str = "repeats") -> str:
    repeats = results.config.get(key) or results.config.get("repeats")
    quick = " (--quick)" if results.config.get("quick") else ""
    return f"median of {repeats} run{'s' if repeats != 1 else ''}{quick}"


def _ratio_note(results: Results) -> str:
    if results.config.get("interleaved"):
        return ("ratios: median over rounds of the per-round ratio of time per call; "
                "a runner's engines took turns, one batch each per round")
    return "ratios: ratio of the medians (engines measured one after another)"


def _batch_size_note(results: Results) -> Optional[str]:
    support = results.config.get("batch_size_parameter") or {}
    lacking = [FAMILIES[key].title for key, where in support.items()
               if key in FAMILIES and not where.get("taskrunners.sync")]
    if not lacking:
        return None
    return (f"{', '.join(lacking)}: no batch_size parameter yet, so bs=1 is today's runner "
            f"(one engine task per call) and auto is not run ({_NO_BATCH_SIZE!r})")


def render_tables(results: Results, console: Any) -> None:
    """Print the results tables on a rich console."""
    from rich.table import Table

    rows = table_rows(results)
    if rows:
        peers = _has_peers(results)
        table = Table(
            title=f"Runner overhead: calls per second, {repeats_text(results)}; "
            "× = runner's time per call ÷ its raw engine's (1.00× = no overhead); "
            "runners with batch_size=1",
            caption="\n".join(filter(None, [_ratio_note(results), _noise_note(rows)])),
            caption_justify="left", title_justify="left", show_lines=False, header_style="bold",
        )
        for name, justify in (("workload", "left"), ("runner", "left"), ("calls", "right"),
                              ("raw engine", "left"), ("raw /s", "right"),
                              ("twin /s", "right"), ("twin ×", "right"),
                              ("facade /s", "right"), ("facade ×", "right")):
            table.add_column(name, justify=justify)
        if peers:
            table.add_column("Prefect /s", justify="right")
            table.add_column("twin vs Prefect", justify="right")
        table.add_column("note", overflow="fold")
        previous = None
        for row in rows:
            if previous is not None and row["workload"] != previous:
                table.add_section()
            values = [
                row["workload"] if row["workload"] != previous else "",
                row["runner"],
                str(row["calls"] or "—"),
                row["raw_engine"],
                _rate(row["raw_rate"]),
                _rate(row["twin_rate"]),
                _styled_ratio(row, "twin_vs_raw"),
                _rate(row["facade_rate"]),
                _styled_ratio(row, "facade_vs_raw"),
            ]
            if peers:
                values.append(_rate(row["prefect_rate"]))
                values.append(_speedup(row["twin_vs_prefect"], row["noisy"]["twin_vs_prefect"]))
            values.append("; ".join(row["notes"]))
            table.add_row(*values)
            previous = row["workload"]
        console.print(table)

    rows = small_call_rows(results)
    if rows:
        caption = [_ratio_note(results),
                   "bs = batch_size; calls: a / b = calls a batch on raw and bs=1 / on auto "
                   "and the peer (each batch sized to take about half a second, tiny aside)",
                   "Sequential and Concurrent run calls in-process: nothing to batch"]
        note = _batch_size_note(results)
        if note:
            caption.append(note)
        if _noise_note(rows):
            caption.append(_noise_note(rows))
        table = Table(
            title=f"Many small calls: calls per second, {repeats_text(results, 'long_repeats')}; "
            "batch_size=1 against the raw engine, batch_size=\"auto\" against batch_size=1 "
            "and against the engine's own bulk map with its default batching",
            caption="\n".join(caption), caption_justify="left",
            title_justify="left", header_style="bold",
        )
        for name in _SMALL_CALL_HEADER[:-1]:
            table.add_column(name, justify="left" if name in _LEFT else "right")
        table.add_column("note", overflow="fold")
        previous = None
        for row in rows:
            if previous is not None and row["workload"] != previous:
                table.add_section()
            table.add_row(
                row["workload"] if row["workload"] != previous else "",
                row["runner"],
                row["calls"],
                _rate(row["raw_rate"]),
                _rate(row["twin_rate"]),
                _styled_ratio(row, "twin_vs_raw"),
                _rate(row["auto_rate"]),
                _speedup(row["auto_vs_twin"], row["noisy"]["auto_vs_twin"]),
                row["bulk_engine"],
                _rate(row["bulk_rate"]),
                _speedup(row["bulk_vs_twin"], row["noisy"]["bulk_vs_twin"]),
                _speedup(row["auto_vs_bulk"], row["noisy"]["auto_vs_bulk"]),
                "; ".join(row["notes"]),
            )
            previous = row["workload"]
        console.print(table)

    startup = Table(
        title="Start-up and shut-down of each engine, in seconds (not part of the rates above)",
        title_justify="left", header_style="bold",
    )
    for name, justify in (("runner", "left"), ("mode", "left"), ("engine", "left"),
                          ("start-up", "right"), ("first result", "right"),
                          ("shut-down", "right"), ("note", "left")):
        startup.add_column(name, justify=justify, overflow="fold")
    for record in results.sessions:
        startup.add_row(
            FAMILIES[record.family].title if record.family in FAMILIES else record.family,
            record.mode,
            record.engine or "—",
            _seconds(record.startup_seconds),
            _seconds(record.first_result_seconds),
            _seconds(record.shutdown_seconds),
            record.note if record.status != "ok" or record.note else "",
        )
    console.print(startup)
    console.print(
        f"[dim]{machine_line(results.machine)} · {results.created} · "
        f"took {results.elapsed_seconds:.0f} s[/]"
    )


def _styled_ratio(row: Dict[str, Any], key: str) -> str:
    value = row[key]
    return f"[{_ratio_style(value)}]{_ratio(value, row['noisy'][key])}[/]"


def _noise_note(rows: List[Dict[str, Any]]) -> Optional[str]:
    """NOISE_RULE, when some ratio of ``rows`` is marked."""
    return NOISE_RULE if any(any(row["noisy"].values()) for row in rows) else None


_SMALL_CALL_HEADER = ("workload", "runner", "calls", "raw /s", "bs=1 /s", "bs=1 ×", "auto /s",
                      "auto vs bs=1", "bulk peer", "peer /s", "peer vs bs=1", "auto vs peer",
                      "note")
#: Columns of words, aligned left; numbers go right.
_LEFT = ("workload", "runner", "raw engine", "bulk peer", "note")


def _markdown_table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in _LEFT else "---:" for h in header) + "|"]
    for values in rows:
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    return lines


def markdown_tables(results: Results) -> str:
    """The results tables in Markdown (for the README)."""
    lines: List[str] = []
    rows = table_rows(results)
    if rows:
        peers = _has_peers(results)
        header = ["workload", "runner", "calls", "raw engine", "raw /s", "twin /s", "twin ×",
                  "facade /s", "facade ×"]
        if peers:
            header += ["Prefect /s", "twin vs Prefect"]
        header.append("note")
        body = []
        previous = None
        for row in rows:
            values = [
                f"**{row['workload']}**" if row["workload"] != previous else "",
                row["runner"], str(row["calls"] or "—"), row["raw_engine"],
                _rate(row["raw_rate"]), _rate(row["twin_rate"]),
                _ratio(row["twin_vs_raw"], row["noisy"]["twin_vs_raw"]),
                _rate(row["facade_rate"]), _ratio(row["facade_vs_raw"], row["noisy"]["facade_vs_raw"]),
            ]
            if peers:
                values += [_rate(row["prefect_rate"]),
                           _speedup(row["twin_vs_prefect"], row["noisy"]["twin_vs_prefect"])]
            values.append("; ".join(row["notes"]))
            body.append(values)
            previous = row["workload"]
        lines += [f"Runner overhead, {repeats_text(results)}; runners with batch_size=1; "
                  f"{_ratio_note(results)}.", ""]
        if _noise_note(rows):
            lines += [_noise_note(rows) + ".", ""]
        lines += _markdown_table(header, body) + [""]
    rows = small_call_rows(results)
    if rows:
        header = list(_SMALL_CALL_HEADER)
        body = []
        previous = None
        for row in rows:
            noisy = row["noisy"]
            body.append([
                f"**{row['workload']}**" if row["workload"] != previous else "",
                row["runner"], row["calls"], _rate(row["raw_rate"]), _rate(row["twin_rate"]),
                _ratio(row["twin_vs_raw"], noisy["twin_vs_raw"]), _rate(row["auto_rate"]),
                _speedup(row["auto_vs_twin"], noisy["auto_vs_twin"]), row["bulk_engine"],
                _rate(row["bulk_rate"]), _speedup(row["bulk_vs_twin"], noisy["bulk_vs_twin"]),
                _speedup(row["auto_vs_bulk"], noisy["auto_vs_bulk"]), "; ".join(row["notes"]),
            ])
            previous = row["workload"]
        lines += [f"Many small calls, {repeats_text(results, 'long_repeats')}; "
                  f"{_ratio_note(results)}; bs = batch_size; calls: a / b = on raw and bs=1 / "
                  "on auto and the peer.", ""]
        for note in (_batch_size_note(results), _noise_note(rows)):
            if note:
                lines += [note + ".", ""]
        lines += _markdown_table(header, body) + [""]
    lines += [
        "| runner | mode | engine | start-up s | first result s | shut-down s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for record in results.sessions:
        lines.append(
            f"| {FAMILIES[record.family].title if record.family in FAMILIES else record.family}"
            f" | {record.mode} | {record.engine or '—'} | {_seconds(record.startup_seconds)}"
            f" | {_seconds(record.first_result_seconds)} | {_seconds(record.shutdown_seconds)} |"
        )
    lines += ["", f"{machine_line(results.machine)} · {results.created}"]
    return "\n".join(lines)


def _seconds(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3f}"


# -- JSON -----------------------------------------------------------------------------------------


def write_json(results: Results, path: pathlib.Path) -> None:
    path.write_text(json.dumps(results.as_dict(), indent=1, default=str) + "\n")


def default_console(file: Any = None) -> Any:
    from rich.console import Console

    stream = file or sys.stdout
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables need more.
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width)
