"""The results tables: on the terminal (rich) and in Markdown (for the README)."""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from benchmarks.families import FAMILIES
from benchmarks.machine import machine_line
from benchmarks.results import NOISE_RULE, Cell, Results, run_families, run_workloads
from benchmarks.workloads import MODES_OF_KIND

__all__ = [
    "render_tables", "markdown_tables", "table_rows", "small_call_rows", "repeats_text",
    "default_console", "CLASSIC_MODES", "SMALL_CALL_MODES",
]

CLASSIC_MODES = MODES_OF_KIND["classic"]
SMALL_CALL_MODES = MODES_OF_KIND["sweep"]


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
                        "bulk_vs_twin": "peer vs bs=1", "auto_vs_bulk": "auto vs peer",
                        "map_vs_bulk": "map vs peer"}


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
            by_mode["map"] = mapped = results.cell(workload, family, "map")
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
                     "auto_vs_bulk": results.noise(auto, bulk),
                     "map_vs_bulk": results.noise(mapped, bulk)}
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
                "map_rate": mapped.calls_per_second if mapped else None,
                "map_vs_bulk": results.time_ratio(mapped, bulk),
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
                _rate(row["map_rate"]),
                _speedup(row["map_vs_bulk"], row["noisy"]["map_vs_bulk"]),
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
                      "map /s", "map vs peer", "note")
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
                _speedup(row["auto_vs_bulk"], noisy["auto_vs_bulk"]), _rate(row["map_rate"]),
                _speedup(row["map_vs_bulk"], noisy["map_vs_bulk"]), "; ".join(row["notes"]),
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


def default_console(file: Any = None) -> Any:
    from rich.console import Console

    stream = file or sys.stdout
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables need more.
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width)
