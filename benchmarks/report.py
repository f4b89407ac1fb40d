"""The results: the terminal tables, the JSON file and the charts."""

from __future__ import annotations

import json
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
    "Results", "machine_info", "render_tables", "markdown_tables", "write_json", "write_chart",
    "write_crossover_chart", "write_charts", "load_json", "chart_and_json", "default_console",
    "RATIO_METHOD",
]

FORMAT = "taskrunners-benchmarks/2"
#: Older files that --from-json still reads (one engine per session, ratios of medians).
_READABLE = ("taskrunners-benchmarks/1", FORMAT)

RATIO_METHOD = (
    "time per call of one cell divided by another's: the median over rounds of the "
    "ratio within each round, for cells of one session (their engines took turns, "
    "one batch each per round); else the ratio of the two medians"
)

_PACKAGES = (
    "taskrunners", "anyio", "sniffio", "cloudpickle", "loky", "joblib", "dask", "distributed",
    "ray", "rich", "matplotlib", "prefect", "prefect-dask", "prefect-ray",
)

_MODE_TITLES = {"raw": "raw engine", "twin": "blocking twin", "facade": "async facade",
                "auto": 'twin, batch_size="auto"', "bulk": "bulk peer", "prefect": "Prefect 3",
                "cluster": "shared cluster"}
_CLASSIC_MODES = MODES_OF_KIND["classic"]
_SMALL_CALL_MODES = MODES_OF_KIND["sweep"]


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
        if cell.session >= 0 and cell.session == reference.session:
            paired = [
                (a / cell.calls) / (b / reference.calls)
                for a, b in zip(cell.seconds, reference.seconds) if a > 0 and b > 0
            ]
            if paired:
                return statistics.median(paired)
        return theirs / mine

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
            "modes": {mode: _MODE_TITLES[mode] for mode in MODES},
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


def _ratio(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def _speedup(overhead: Optional[float]) -> str:
    """An overhead against a peer, said as how many times faster (or slower) we are."""
    if overhead is None:
        return "—"
    if overhead <= 1:
        factor = 1 / overhead
        return f"{factor:,.0f}× faster" if factor >= 100 else f"{factor:.3g}× faster"
    return f"{overhead:.3g}× slower"


def _ratio_style(value: Optional[float]) -> str:
    if value is None:
        return "dim"
    if value <= 1.25:
        return "green"
    if value <= 2.0:
        return "yellow"
    return "red"


def _families(results: Results) -> List[str]:
    chosen = results.config.get("runners") or list(FAMILIES)
    return [key for key in FAMILIES if key in chosen]


def _workloads(results: Results, kinds: tuple = ("classic", "tiny", "sweep")) -> List[str]:
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


def table_rows(results: Results) -> List[Dict[str, Any]]:
    """The runner-overhead table (classic workloads), one row per workload and runner."""
    rows = []
    for workload in _workloads(results, ("classic",)):
        for family in _families(results):
            by_mode = {mode: results.cell(workload, family, mode) for mode in _CLASSIC_MODES}
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
            for mode in _CLASSIC_MODES:
                cell = by_mode[mode]
                row[f"{mode}_rate"] = cell.calls_per_second if cell else None
                row[f"{mode}_calls"] = cell.calls if cell else None
            for mode in ("twin", "facade"):
                cell = by_mode[mode]
                row[f"{mode}_vs_raw"] = results.overhead(cell, "raw") if cell else None
                row[f"{mode}_vs_prefect"] = results.overhead(cell, "prefect") if cell else None
            rows.append(row)
    return rows


def small_call_rows(results: Results) -> List[Dict[str, Any]]:
    """The many-small-calls table (tiny and the sweep), one row per workload and runner."""
    rows = []
    for workload in _workloads(results, ("tiny", "sweep")):
        for family in _families(results):
            by_mode = {mode: results.cell(workload, family, mode) for mode in _SMALL_CALL_MODES}
            if not any(by_mode.values()):
                continue
            raw, twin, auto, bulk = (by_mode[m] for m in _SMALL_CALL_MODES)
            one = twin or raw
            batched = auto or bulk
            calls = f"{one.calls:,}" if one else "—"
            if batched is not None and (one is None or batched.calls != one.calls):
                calls = f"{calls} / {batched.calls:,}"
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
                "notes": _notes(by_mode, said=(_NO_BATCH_SIZE,)),
            })
    return rows


def _repeats_text(results: Results, key: str = "repeats") -> str:
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
            title=f"Runner overhead: calls per second, {_repeats_text(results)}; "
            "× = runner's time per call ÷ its raw engine's (1.00× = no overhead); "
            "runners with batch_size=1",
            caption=_ratio_note(results), caption_justify="left",
            title_justify="left", show_lines=False, header_style="bold",
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
                f"[{_ratio_style(row['twin_vs_raw'])}]{_ratio(row['twin_vs_raw'])}[/]",
                _rate(row["facade_rate"]),
                f"[{_ratio_style(row['facade_vs_raw'])}]{_ratio(row['facade_vs_raw'])}[/]",
            ]
            if peers:
                values.append(_rate(row["prefect_rate"]))
                values.append(_speedup(row["twin_vs_prefect"]))
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
        table = Table(
            title=f"Many small calls: calls per second, {_repeats_text(results, 'long_repeats')}; "
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
                f"[{_ratio_style(row['twin_vs_raw'])}]{_ratio(row['twin_vs_raw'])}[/]",
                _rate(row["auto_rate"]),
                _speedup(row["auto_vs_twin"]),
                row["bulk_engine"],
                _rate(row["bulk_rate"]),
                _speedup(row["bulk_vs_twin"]),
                _speedup(row["auto_vs_bulk"]),
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
                _rate(row["raw_rate"]), _rate(row["twin_rate"]), _ratio(row["twin_vs_raw"]),
                _rate(row["facade_rate"]), _ratio(row["facade_vs_raw"]),
            ]
            if peers:
                values += [_rate(row["prefect_rate"]), _speedup(row["twin_vs_prefect"])]
            values.append("; ".join(row["notes"]))
            body.append(values)
            previous = row["workload"]
        lines += [f"Runner overhead, {_repeats_text(results)}; runners with batch_size=1; "
                  f"{_ratio_note(results)}.", ""]
        lines += _markdown_table(header, body) + [""]
    rows = small_call_rows(results)
    if rows:
        header = list(_SMALL_CALL_HEADER)
        body = []
        previous = None
        for row in rows:
            body.append([
                f"**{row['workload']}**" if row["workload"] != previous else "",
                row["runner"], row["calls"], _rate(row["raw_rate"]), _rate(row["twin_rate"]),
                _ratio(row["twin_vs_raw"]), _rate(row["auto_rate"]), _speedup(row["auto_vs_twin"]),
                row["bulk_engine"], _rate(row["bulk_rate"]), _speedup(row["bulk_vs_twin"]),
                _speedup(row["auto_vs_bulk"]), "; ".join(row["notes"]),
            ])
            previous = row["workload"]
        lines += [f"Many small calls, {_repeats_text(results, 'long_repeats')}; "
                  f"{_ratio_note(results)}; bs = batch_size; calls: a / b = on raw and bs=1 / "
                  "on auto and the peer.", ""]
        note = _batch_size_note(results)
        if note:
            lines[-1:-1] = [note + ".", ""]
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


# -- the chart ------------------------------------------------------------------------------------

_MODE_COLOURS = {"raw": "#7f7f7f", "twin": "#1f77b4", "facade": "#ff7f0e", "prefect": "#2ca02c"}


def write_chart(results: Results, path: pathlib.Path) -> bool:
    """Draw calls per second (top) and overhead against the raw engine (bottom), per
    classic workload; False (and nothing drawn) when the run had none."""
    workloads = _workloads(results, ("classic",))
    if not workloads:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = _families(results)
    modes = [m for m in _CLASSIC_MODES if any(c.mode == m for c in results.cells)]
    columns = max(1, len(workloads))
    figure, axes = plt.subplots(
        2, columns, figsize=(4.6 * columns + 0.6, 8.6), squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    width = 0.8 / max(1, len(modes))
    # One scale for every overhead panel, symmetric around 1 on a log axis.
    overheads = [
        value for cell in results.cells if cell.mode in ("twin", "facade")
        and cell.workload in workloads for value in [results.overhead(cell, "raw")] if value
    ]
    limit = max([2.0] + [max(v, 1 / v) * 1.25 for v in overheads])
    for column, workload in enumerate(workloads):
        top, bottom = axes[0][column], axes[1][column]
        xs = list(range(len(families)))
        for index, mode in enumerate(modes):
            offset = (index - (len(modes) - 1) / 2) * width
            rates = []
            for family in families:
                cell = results.cell(workload, family, mode)
                rates.append(cell.calls_per_second if cell and cell.calls_per_second else 0.0)
            top.bar([x + offset for x in xs], rates, width, label=_MODE_TITLES[mode],
                    color=_MODE_COLOURS[mode])
        top.set_yscale("log")
        _plain_log_ticks(top)
        top.set_title(f"{workload}: {WORKLOADS[workload].description}"
                      if workload in WORKLOADS else workload, fontsize=9)
        top.set_xticks(xs)
        top.set_xticklabels([FAMILIES[f].title for f in families], fontsize=8)
        top.grid(axis="y", which="major", alpha=0.3)
        if column == 0:
            top.set_ylabel("calls per second (log)")
        _mark_missing(top, results, workload, families)

        ratio_modes = [("twin", "twin ÷ raw"), ("facade", "facade ÷ raw")]
        ratio_width = 0.8 / len(ratio_modes)
        for index, (mode, label) in enumerate(ratio_modes):
            offset = (index - (len(ratio_modes) - 1) / 2) * ratio_width
            values = []
            for family in families:
                cell = results.cell(workload, family, mode)
                values.append(results.overhead(cell, "raw") if cell else None)
            # Bars grow from 1 (no overhead): up when slower than raw, down when faster.
            bars = bottom.bar([x + offset for x in xs], [(v or 1.0) - 1.0 for v in values],
                              ratio_width, bottom=1.0, label=label, color=_MODE_COLOURS[mode])
            for bar, value in zip(bars, values):
                if value:
                    bottom.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value),
                                    ha="center", va="bottom" if value >= 1 else "top",
                                    fontsize=6.5)
        bottom.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        bottom.set_yscale("log")
        bottom.set_ylim(1 / limit, limit)
        _plain_log_ticks(bottom)
        bottom.set_xticks(xs)
        bottom.set_xticklabels([FAMILIES[f].title for f in families], fontsize=8)
        bottom.grid(axis="y", alpha=0.3)
        if column == 0:
            bottom.set_ylabel("overhead: time per call ÷ raw engine's")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
                  frameon=False, bbox_to_anchor=(0.5, 0.935))
    figure.suptitle(
        f"taskrunners benchmarks — {_repeats_text(results)} · {results.created[:10]}\n"
        f"{machine_line(results.machine)}",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.91))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


_FAMILY_COLOURS = {"sequential": "#7f7f7f", "concurrent": "#9467bd", "parallel": "#1f77b4",
                   "dask": "#ff7f0e", "ray": "#2ca02c"}
#: How each mode is drawn on the crossover chart: line style, marker.
_CROSSOVER_STYLES = {"twin": ("-", "o"), "auto": ("--", "s"), "bulk": (":", "^")}
#: Where a no-op call sits on the log axis of call lengths, in ms: a decade left of the rest.
_NOOP_DECADES = 1


def write_crossover_chart(results: Results, path: pathlib.Path) -> bool:
    """Draw calls per second against the length of a call (the sweep, log-log), one line
    per runner and batch size and per bulk peer, beside the tiny workload's total times;
    False (and nothing drawn) when the run had neither."""
    sweep = [w for w in _workloads(results, ("sweep",)) if w in WORKLOADS]
    tiny = [w for w in _workloads(results, ("tiny",)) if w in WORKLOADS]
    if not sweep and not tiny:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = _families(results)
    panels = [kind for kind, chosen in (("sweep", sweep), ("tiny", tiny)) if chosen]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(7.6 * len(panels) + 0.6, 6.4), squeeze=False,
        gridspec_kw={"width_ratios": [3, 2][: len(panels)]},
    )
    for axis, kind in zip(axes[0], panels):
        if kind == "sweep":
            _draw_sweep(axis, results, sweep, families)
        else:
            _draw_tiny(axis, results, tiny[0], families)
    figure.suptitle(
        f"taskrunners: which runner for which call size — "
        f"{_repeats_text(results, 'long_repeats')} · {results.created[:10]}\n"
        f"{machine_line(results.machine)}",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _line_label(results: Results, family: str, mode: str) -> str:
    title = FAMILIES[family].title
    if mode == "bulk":
        cell = next((c for c in results.cells if c.family == family and c.mode == "bulk"
                     and c.engine), None)
        return cell.engine if cell else f"{title}'s bulk peer"
    if not FAMILIES[family].batching:
        return title
    return f"{title}, batch_size={'auto' if mode == 'auto' else 1}"


def _draw_sweep(axis: Any, results: Results, sweep: List[str], families: List[str]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lengths = {w: WORKLOADS[w].seconds_per_call * 1000 for w in sweep}
    positive = [ms for ms in lengths.values() if ms > 0]
    noop_x = (min(positive) if positive else 1.0) / 10**_NOOP_DECADES
    xs_of = {w: ms if ms > 0 else noop_x for w, ms in lengths.items()}
    for family in families:
        for mode, (style, marker) in _CROSSOVER_STYLES.items():
            points = [
                (xs_of[w], cell.calls_per_second) for w in sweep
                for cell in [results.cell(w, family, mode)]
                if cell is not None and cell.calls_per_second
            ]
            if not points:
                continue
            axis.plot(*zip(*points), linestyle=style, marker=marker, markersize=5,
                      color=_FAMILY_COLOURS.get(family, "black"), linewidth=1.6,
                      alpha=0.75 if mode == "bulk" else 1.0,
                      label=_line_label(results, family, mode))
    workers = results.config.get("engines", {}).get("workers") or results.machine.get("usable_cpus")
    if workers and positive:
        # The ceiling: every worker busy with calls and nothing else.
        ideal = sorted(positive)
        axis.plot(ideal, [workers * 1000 / ms for ms in ideal], color="black", linewidth=0.8,
                  linestyle=(0, (1, 3)), label=f"ceiling: {workers} workers always busy")
    axis.set_xscale("log")
    axis.set_yscale("log")
    ticks = sorted(set(xs_of.values()))
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_major_formatter(
        FuncFormatter(lambda v, _: "no-op" if abs(v - noop_x) < noop_x / 100 else f"{v:g}")
    )
    if positive and noop_x in xs_of.values():
        # The no-op point is no length at all: mark the break in the axis.
        axis.axvline((noop_x * min(positive)) ** 0.5, color="#bbbbbb", linewidth=0.8,
                     linestyle="--")
    _plain_log_ticks(axis)
    axis.grid(which="major", alpha=0.3)
    axis.set_xlabel("length of one call: ms of pure-Python work (log)")
    axis.set_ylabel("calls per second (log)")
    axis.set_title("Calls per second against call length: higher is better; solid: "
                   "batch_size=1, dashed: auto, dotted: bulk peer", fontsize=9)
    axis.legend(fontsize=7, ncol=2, loc="lower left", frameon=False)


def _draw_tiny(axis: Any, results: Results, workload: str, families: List[str]) -> None:
    labels, values, colours, hatches, notes = [], [], [], [], []
    for family in families:
        for mode in _SMALL_CALL_MODES:
            cell = results.cell(workload, family, mode)
            if cell is None:
                continue
            label = "raw: " + (cell.engine or "raw engine") if mode == "raw" \
                else _line_label(results, family, mode)
            labels.append(label)
            values.append(cell.median_seconds)
            colours.append(_FAMILY_COLOURS.get(family, "black"))
            hatches.append({"raw": "..", "bulk": "//"}.get(mode, ""))
            notes.append(cell.status if cell.status != "ok" else "")
    ys = list(range(len(labels)))[::-1]
    known = [v for v in values if v]
    floor = min(known) / 3 if known else 0.001
    bars = axis.barh(ys, [v or 0 for v in values], color=colours, alpha=0.85, left=0)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    axis.set_xscale("log")
    axis.set_xlim(left=floor, right=(max(known) * 4) if known else 1.0)
    for y, value, note in zip(ys, values, notes):
        text = f"{value:.3g} s" if value else (note or "—")
        axis.annotate(text, (value or floor, y), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=7, color="black" if value else "#a00000")
    axis.set_yticks(ys)
    axis.set_yticklabels(labels, fontsize=7)
    calls = next((c.calls for c in results.cells if c.workload == workload and c.calls), None)
    axis.set_xlabel("seconds (log): lower is better")
    axis.set_title(f"{calls:,} no-op calls: median time of one batch" if calls
                   else workload, fontsize=9)
    axis.grid(axis="x", alpha=0.3)


def _plain_log_ticks(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())


def _mark_missing(axis: Any, results: Results, workload: str, families: List[str]) -> None:
    """Write "skipped"/"failed" where a runner has no bars."""
    for x, family in enumerate(families):
        cells = [results.cell(workload, family, m) for m in ("twin", "facade")]
        statuses = {c.status for c in cells if c is not None}
        if statuses and "ok" not in statuses:
            label = "failed" if "failed" in statuses else "skipped"
            axis.annotate(label, (x, 0.02), xycoords=("data", "axes fraction"),
                          ha="center", fontsize=7, rotation=90, color="#a00000")


def default_console(file: Any = None) -> Any:
    from rich.console import Console

    stream = file or sys.stdout
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables need more.
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width)


def chart_and_json(results: Results, output: pathlib.Path) -> List[pathlib.Path]:
    """Write ``results.json`` and the charts the run has data for; the paths written."""
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "results.json"
    write_json(results, json_path)
    return [json_path, *write_charts(results, output)]


def write_charts(results: Results, output: pathlib.Path) -> List[pathlib.Path]:
    """``results.png`` (runner overhead) and ``crossover.png`` (many small calls), when
    the run has data for them; the paths written."""
    written = []
    for name, draw in (("results.png", write_chart), ("crossover.png", write_crossover_chart)):
        if draw(results, output / name):
            written.append(output / name)
    return written
