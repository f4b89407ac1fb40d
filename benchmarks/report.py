"""The results: the terminal tables, the JSON file and the chart."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.engines import FAMILIES
from benchmarks.measure import MODES, Cell, SessionRecord
from benchmarks.workloads import WORKLOADS

__all__ = [
    "Results", "machine_info", "render_tables", "markdown_tables", "write_json", "write_chart",
    "load_json", "chart_and_json", "default_console",
]

FORMAT = "taskrunners-benchmarks/1"

_PACKAGES = (
    "taskrunners", "anyio", "sniffio", "cloudpickle", "loky", "dask", "distributed", "ray",
    "rich", "matplotlib", "prefect", "prefect-dask", "prefect-ray",
)

_MODE_TITLES = {"raw": "raw engine", "twin": "blocking twin", "facade": "async facade",
                "prefect": "Prefect 3"}


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

    def overhead(self, cell: Cell, against: str) -> Optional[float]:
        """Time per call of ``cell`` divided by that of the same workload in ``against`` mode.

        Above 1: slower than the reference; for ``against="raw"``, the runner's overhead.
        """
        reference = self.cell(cell.workload, cell.family, against)
        if reference is None or reference is cell:
            return None
        mine, theirs = cell.calls_per_second, reference.calls_per_second
        if not mine or not theirs:
            return None
        return theirs / mine

    @property
    def failures(self) -> List[Cell]:
        return [cell for cell in self.cells if cell.status == "failed"]

    def as_dict(self) -> Dict[str, Any]:
        cells = []
        for cell in self.cells:
            data = cell.as_dict()
            if cell.mode in ("twin", "facade"):
                data["overhead_vs_raw"] = self.overhead(cell, "raw")
                data["overhead_vs_prefect"] = self.overhead(cell, "prefect")
            cells.append(data)
        return {
            "format": FORMAT,
            "created": self.created,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "interrupted": self.interrupted,
            "command": self.command,
            "machine": self.machine,
            "config": self.config,
            "environment": self.environment,
            "workloads": {
                name: {
                    "description": w.description,
                    "default_calls": w.calls,
                    "quick_calls": w.quick_calls,
                    "seconds_per_call": w.seconds_per_call,
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
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} results file (format={data.get('format')!r}).")
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


def _workloads(results: Results) -> List[str]:
    return list(results.config.get("workloads") or WORKLOADS)


def _has_peers(results: Results) -> bool:
    return any(cell.mode == "prefect" for cell in results.cells)


def table_rows(results: Results) -> List[Dict[str, Any]]:
    """One row per workload and runner: rates, overheads and notes, for any renderer."""
    rows = []
    for workload in _workloads(results):
        for family in _families(results):
            by_mode = {mode: results.cell(workload, family, mode) for mode in MODES}
            raw = by_mode["raw"]
            present = [mode for mode in MODES if by_mode[mode] is not None]
            noted: Dict[str, List[str]] = {}
            for mode in present:
                cell = by_mode[mode]
                if cell.status != "ok" and cell.note:
                    noted.setdefault(cell.note, []).append(mode)
            notes = [
                text if modes == present else f"{', '.join(modes)}: {text}"
                for text, modes in noted.items()
            ]
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
            for mode in MODES:
                cell = by_mode[mode]
                row[f"{mode}_rate"] = cell.calls_per_second if cell else None
                row[f"{mode}_calls"] = cell.calls if cell else None
            for mode in ("twin", "facade"):
                cell = by_mode[mode]
                row[f"{mode}_vs_raw"] = results.overhead(cell, "raw") if cell else None
                row[f"{mode}_vs_prefect"] = results.overhead(cell, "prefect") if cell else None
            rows.append(row)
    return rows


def render_tables(results: Results, console: Any) -> None:
    """Print the results tables on a rich console."""
    from rich.table import Table

    repeats = results.config.get("repeats")
    peers = _has_peers(results)
    title = (
        f"Calls per second, median of {repeats} run{'s' if repeats != 1 else ''}"
        f"{' (--quick)' if results.config.get('quick') else ''}; "
        "× = runner's time per call ÷ its raw engine's (1.00× = no overhead)"
    )
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    table.add_column("workload")
    table.add_column("runner")
    table.add_column("calls", justify="right")
    table.add_column("raw engine")
    table.add_column("raw /s", justify="right")
    table.add_column("twin /s", justify="right")
    table.add_column("twin ×", justify="right")
    table.add_column("facade /s", justify="right")
    table.add_column("facade ×", justify="right")
    if peers:
        table.add_column("Prefect /s", justify="right")
        table.add_column("twin vs Prefect", justify="right")
    table.add_column("note", overflow="fold")
    previous = None
    for row in table_rows(results):
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


def markdown_tables(results: Results) -> str:
    """The results tables in Markdown (for the README)."""
    peers = _has_peers(results)
    header = ["workload", "runner", "calls", "raw engine", "raw /s", "twin /s", "twin ×",
              "facade /s", "facade ×"]
    if peers:
        header += ["Prefect /s", "twin vs Prefect"]
    header.append("note")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h.endswith(("/s", "×", "calls")) else "---"
                            for h in header) + "|"]
    previous = None
    for row in table_rows(results):
        values = [
            f"**{row['workload']}**" if row["workload"] != previous else "",
            row["runner"], str(row["calls"] or "—"), row["raw_engine"],
            _rate(row["raw_rate"]), _rate(row["twin_rate"]), _ratio(row["twin_vs_raw"]),
            _rate(row["facade_rate"]), _ratio(row["facade_vs_raw"]),
        ]
        if peers:
            values += [_rate(row["prefect_rate"]), _speedup(row["twin_vs_prefect"])]
        values.append("; ".join(row["notes"]))
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
        previous = row["workload"]
    lines += [
        "",
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


def write_chart(results: Results, path: pathlib.Path) -> None:
    """Draw calls per second (top) and overhead against the raw engine (bottom), per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = _workloads(results)
    families = _families(results)
    modes = [m for m in MODES if any(c.mode == m for c in results.cells)]
    columns = max(1, len(workloads))
    figure, axes = plt.subplots(
        2, columns, figsize=(4.6 * columns + 0.6, 8.6), squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    width = 0.8 / max(1, len(modes))
    # One scale for every overhead panel, symmetric around 1 on a log axis.
    overheads = [
        value for cell in results.cells if cell.mode in ("twin", "facade")
        for value in [results.overhead(cell, "raw")] if value
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
    repeats = results.config.get("repeats")
    figure.suptitle(
        f"taskrunners benchmarks — median of {repeats} run{'s' if repeats != 1 else ''}"
        f"{' (--quick)' if results.config.get('quick') else ''} · {results.created[:10]}\n"
        f"{machine_line(results.machine)}",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.91))
    figure.savefig(path, dpi=110)
    plt.close(figure)


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


def chart_and_json(results: Results, output: pathlib.Path) -> Tuple[pathlib.Path, pathlib.Path]:
    output.mkdir(parents=True, exist_ok=True)
    json_path, chart_path = output / "results.json", output / "results.png"
    write_json(results, json_path)
    write_chart(results, chart_path)
    return json_path, chart_path
