"""The charts: ``results.png`` (runner overhead) and ``crossover.png`` (many small calls).

Each chart says how to read it. A value axis starts at zero unless the values span
more than a decade; then it is logarithmic and its label says so (ratios always are,
their bars growing from 1). Tick labels carry as many decimals as it takes to tell
them apart. A rate or ratio that is noisy by ``results.NOISE_RULE`` is drawn faded and
hatched (bars) or hollow (points), with a legend entry saying so. On the crossover
chart a line style and marker mean one mode in both panels, under one legend.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

from matplotlib.ticker import Formatter

from benchmarks.families import FAMILIES
from benchmarks.machine import machine_line
from benchmarks.results import (
    MIN_CALLS,
    MIN_ROUNDS,
    MODE_TITLES,
    NOISY_SPREAD,
    Results,
    run_families,
    run_workloads,
    write_json,
)
from benchmarks.tables import CLASSIC_MODES, SMALL_CALL_MODES, repeats_text
from benchmarks.workloads import WORKLOADS

__all__ = [
    "overhead_figure", "crossover_figure", "write_chart", "write_crossover_chart",
    "write_charts", "chart_and_json", "MODE_STYLES", "LOG_SPAN",
]

#: Values spanning more than this factor get a log axis; else a linear one from zero.
LOG_SPAN = 10.0

_NOISY_TEXT = (f"noisy: under {MIN_ROUNDS} rounds or {MIN_CALLS} calls, "
               f"or rounds over {NOISY_SPREAD:g}× apart")
_MODE_COLOURS = {"raw": "#7f7f7f", "twin": "#1f77b4", "facade": "#ff7f0e", "prefect": "#2ca02c"}
_FAMILY_COLOURS = {"sequential": "#7f7f7f", "concurrent": "#9467bd", "parallel": "#1f77b4",
                   "dask": "#ff7f0e", "ray": "#2ca02c"}
#: How the crossover chart draws each mode, in both panels: line style, marker, marker
#: size (larger markers under smaller ones, so markers at one point nest), legend text.
MODE_STYLES: Dict[str, Tuple[Any, str, float, str]] = {
    "raw": ("-.", "D", 6.0, "raw engine (one task per call)"),
    "bulk": (":", "^", 9.0, "engine's bulk map (the peer)"),
    "twin": ("-", "o", 7.0, "runner, batch_size=1 (Sequential, Concurrent: the runner)"),
    "auto": ("--", "s", 4.5, 'runner, batch_size="auto"'),
}
#: Where a no-op call sits on the log axis of call lengths, in ms: a decade left of the rest.
_NOOP_DECADES = 1
#: Each runner's points on the sweep are nudged sideways, by up to this many decades
#: in all, so that no runner's point hides another's; within a runner, markers of
#: different shapes and sizes nest, the smaller on top, each with a white rim.
_DODGE_DECADES = 0.25


# -- results.png --------------------------------------------------------------------------------


def overhead_figure(results: Results) -> Optional[Any]:
    """Calls per second (top) and overhead against the raw engine (bottom), per classic
    workload, as a matplotlib Figure; None when the run had no classic workload."""
    workloads = run_workloads(results, ("classic",))
    if not workloads:
        return None
    plt = _pyplot()
    families = run_families(results)
    modes = [m for m in CLASSIC_MODES if any(c.mode == m for c in results.cells)]
    columns = max(1, len(workloads))
    figure, axes = plt.subplots(
        2, columns, figsize=(4.6 * columns + 0.6, 8.8), squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    # One scale for every overhead panel, symmetric around 1 on a log axis.
    overheads = [
        value for cell in results.cells if cell.mode in ("twin", "facade")
        and cell.workload in workloads for value in [results.overhead(cell, "raw")] if value
    ]
    limit = max([2.0] + [max(v, 1 / v) * 1.25 for v in overheads])
    xs = list(range(len(families)))
    names = [FAMILIES[f].title for f in families]
    for column, workload in enumerate(workloads):
        top, bottom = axes[0][column], axes[1][column]
        _draw_rates(top, results, workload, families, modes)
        top.set_title(f"{workload}: {WORKLOADS[workload].description}"
                      if workload in WORKLOADS else workload, fontsize=9)
        top.set_xticks(xs)
        top.set_xticklabels(names, fontsize=8)
        _mark_missing(top, results, workload, families)
        _draw_overheads(bottom, results, workload, families, limit)
        bottom.set_xticks(xs)
        bottom.set_xticklabels(names, fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=_MODE_COLOURS[m], label=MODE_TITLES[m]) for m in modes]
    handles.append(Patch(facecolor="#7f7f7f", alpha=0.4, hatch="////", edgecolor="#444444",
                         label=_NOISY_TEXT))
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8,
                  frameon=False, bbox_to_anchor=(0.5, 0.935))
    figure.suptitle(
        f"taskrunners benchmarks — {repeats_text(results)} · {results.created[:10]}\n"
        f"{machine_line(results.machine)}",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.91))
    return figure


def _draw_rates(axis: Any, results: Results, workload: str, families: List[str],
                modes: List[str]) -> None:
    width = 0.8 / max(1, len(modes))
    drawn = []
    for index, mode in enumerate(modes):
        offset = (index - (len(modes) - 1) / 2) * width
        for x, family in enumerate(families):
            cell = results.cell(workload, family, mode)
            rate = cell.calls_per_second if cell else None
            if not rate:
                continue
            drawn.append(rate)
            _bar(axis, x + offset, rate, width, 0.0, _MODE_COLOURS[mode],
                 results.rate_noise(cell))
    log = _value_axis(axis, drawn)
    axis.set_ylabel("calls per second — " + ("log scale, bars do not start at 0" if log
                                             else "from 0"), fontsize=8)
    axis.grid(axis="y", which="major", alpha=0.3)


def _draw_overheads(axis: Any, results: Results, workload: str, families: List[str],
                    limit: float) -> None:
    from matplotlib.ticker import LogLocator

    ratio_modes = ("twin", "facade")
    width = 0.8 / len(ratio_modes)
    for index, mode in enumerate(ratio_modes):
        offset = (index - (len(ratio_modes) - 1) / 2) * width
        for x, family in enumerate(families):
            cell = results.cell(workload, family, mode)
            value = results.overhead(cell, "raw") if cell else None
            if not value:
                continue
            noisy = results.noise(cell, results.cell(workload, family, "raw"))
            # Bars grow from 1 (no overhead): up when slower than raw, down when faster.
            _bar(axis, x + offset, value - 1.0, width, 1.0, _MODE_COLOURS[mode], noisy)
            axis.annotate(("~" if noisy else "") + f"{value:.2f}", (x + offset, value),
                          ha="center", va="bottom" if value >= 1 else "top", fontsize=6.5)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_ylim(1 / limit, limit)
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    _distinct_labels(axis.yaxis)
    axis.grid(axis="y", alpha=0.3)
    axis.set_ylabel("time per call ÷ raw engine's\nlog scale, bars start at 1 = no overhead",
                    fontsize=8)


def _bar(axis: Any, x: float, height: float, width: float, bottom: float, colour: str,
         noisy: Optional[str]) -> None:
    """One bar; faded and hatched when its value is noisy."""
    axis.bar([x], [height], width, bottom=bottom, color=colour,
             alpha=0.4 if noisy else 1.0, hatch="////" if noisy else None,
             edgecolor="#444444" if noisy else colour, linewidth=0.0 if not noisy else 0.6,
             gid="noisy" if noisy else "ok")


def _mark_missing(axis: Any, results: Results, workload: str, families: List[str]) -> None:
    """Write "skipped"/"failed" where a runner has no bars."""
    for x, family in enumerate(families):
        cells = [results.cell(workload, family, m) for m in ("twin", "facade")]
        statuses = {c.status for c in cells if c is not None}
        if statuses and "ok" not in statuses:
            label = "failed" if "failed" in statuses else "skipped"
            axis.annotate(label, (x, 0.02), xycoords=("data", "axes fraction"),
                          ha="center", fontsize=7, rotation=90, color="#a00000")


# -- crossover.png ------------------------------------------------------------------------------


def crossover_figure(results: Results) -> Optional[Any]:
    """Calls per second against the length of a call (the sweep), beside the tiny
    workload's batch times, as a matplotlib Figure; None when the run had neither."""
    sweep = [w for w in run_workloads(results, ("sweep",)) if w in WORKLOADS]
    tiny = [w for w in run_workloads(results, ("tiny",)) if w in WORKLOADS]
    if not sweep and not tiny:
        return None
    plt = _pyplot()
    families = run_families(results)
    panels = [kind for kind, chosen in (("sweep", sweep), ("tiny", tiny)) if chosen]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(7.6 * len(panels) + 0.6, 7.0), squeeze=False,
        gridspec_kw={"width_ratios": [3, 2][: len(panels)]},
    )
    modes, drawn_families, noisy, ceiling = set(), set(), False, None
    for axis, kind in zip(axes[0], panels):
        if kind == "sweep":
            drawn, ceiling = _draw_sweep(axis, results, sweep, families)
        else:
            drawn = _draw_tiny(axis, results, tiny[0], families)
        for family, mode, has_noise in drawn:
            modes.add(mode)
            drawn_families.add(family)
            noisy = noisy or has_noise
    styles, colours = _crossover_legend(results, families, modes, drawn_families, ceiling)
    figure.legend(handles=styles, loc="upper left", ncol=2, fontsize=8, frameon=False,
                  bbox_to_anchor=(0.03, 0.925), title="line style and marker: what ran",
                  title_fontsize=8, alignment="left")
    figure.legend(handles=colours, loc="upper right", ncol=2, fontsize=8, frameon=False,
                  bbox_to_anchor=(0.97, 0.925), title="colour: which runner",
                  title_fontsize=8, alignment="left")
    figure.suptitle(
        f"taskrunners: which runner for which call size — "
        f"{repeats_text(results, 'long_repeats')} · {results.created[:10]}\n"
        f"{machine_line(results.machine)}",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.83))
    return figure


def _crossover_legend(results: Results, families: List[str], modes: set,
                      drawn_families: set, ceiling: Optional[int]) -> Tuple[List[Any], List[Any]]:
    """The legend of both panels: a line style and marker per mode (and what hollow
    means), and a colour per runner."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color="black", linestyle=style, marker=marker, markersize=6,
               label=text)
        for mode, (style, marker, _, text) in MODE_STYLES.items() if mode in modes
    ]
    handles.append(Line2D([], [], color="black", linestyle="none", marker="o", markersize=6,
                          markerfacecolor="white", label="hollow: " + _NOISY_TEXT))
    colours = []
    for family in families:
        if family in drawn_families:
            peer = next((c.engine for c in results.cells
                         if c.family == family and c.mode == "bulk" and c.engine), "")
            colours.append(Patch(color=_FAMILY_COLOURS.get(family, "black"),
                                 label=FAMILIES[family].title + (f" (peer: {peer})" if peer else "")))
    if ceiling:
        colours.append(Patch(color="black", alpha=0.1,
                             label=f"out of reach: more than {ceiling} workers always busy"))
    return handles, colours


def _dodged(index: int, count: int) -> float:
    """The factor that moves runner ``index`` of ``count`` sideways on a log axis."""
    if count < 2:
        return 1.0
    step = min(0.07, _DODGE_DECADES / (count - 1))
    return 10 ** ((index - (count - 1) / 2) * step)


def _draw_sweep(axis: Any, results: Results, sweep: List[str], families: List[str]):
    """The sweep's lines; returns what it drew, as (family, mode, any noisy point), and
    the number of workers of the ceiling (None without one)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lengths = {w: WORKLOADS[w].seconds_per_call * 1000 for w in sweep}
    positive = [ms for ms in lengths.values() if ms > 0]
    noop_x = (min(positive) if positive else 1.0) / 10**_NOOP_DECADES
    xs_of = {w: ms if ms > 0 else noop_x for w, ms in lengths.items()}
    series = []
    for family in families:
        for mode in ("bulk", "twin", "auto"):
            points = [
                (xs_of[w], cell.calls_per_second, results.rate_noise(cell)) for w in sweep
                for cell in [results.cell(w, family, mode)]
                if cell is not None and cell.calls_per_second
            ]
            if points:
                series.append((family, mode, points))
    drawn, rates = [], []
    dodged = list(dict.fromkeys(family for family, _, _ in series))
    for family, mode, points in series:
        factor = _dodged(dodged.index(family), len(dodged))
        style, marker, size, _ = MODE_STYLES[mode]
        colour = _FAMILY_COLOURS.get(family, "black")
        xs = [x * factor for x, _, _ in points]
        ys = [y for _, y, _ in points]
        rates += ys
        order = 2 + list(MODE_STYLES).index(mode)  # larger markers under smaller ones
        axis.plot(xs, ys, linestyle=style, marker=marker, markersize=size, color=colour,
                  markeredgecolor="white", markeredgewidth=0.8, linewidth=1.5, alpha=0.9,
                  zorder=order, gid=f"{family}/{mode}")
        noisy = [(x, y) for x, (_, y, why) in zip(xs, points) if why]
        if noisy:
            axis.plot(*zip(*noisy), linestyle="none", marker=marker, markersize=size,
                      markerfacecolor="white", markeredgecolor=colour, markeredgewidth=1.2,
                      zorder=order + 0.5)
        drawn.append((family, mode, bool(noisy)))
    axis.set_xscale("log")
    axis.set_yscale("log")
    workers = results.config.get("engines", {}).get("workers") or results.machine.get("usable_cpus")
    top = max(rates) * 3 if rates else 10.0
    ceiling = None
    if workers and positive:
        # Out of reach: every worker busy with calls and nothing else.
        ideal = sorted(positive)
        ceiling_rates = [workers * 1000 / ms for ms in ideal]
        top = max(top, max(ceiling_rates) * 1.5)
        axis.fill(ideal + ideal[::-1], ceiling_rates + [top] * len(ideal), color="black",
                  alpha=0.1, linewidth=0, zorder=1)
        axis.annotate(f"out of reach: more than\n{workers} workers always busy",
                      (ideal[-1], top), xytext=(-4, -4), textcoords="offset points",
                      ha="right", va="top", fontsize=7, color="#555555")
        ceiling = workers
    axis.set_ylim(top=top)
    ticks = sorted(set(xs_of.values()))
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_major_formatter(
        FuncFormatter(lambda v, _: "no-op" if abs(v - noop_x) < noop_x / 100 else f"{v:g}")
    )
    if positive and noop_x in xs_of.values():
        # The no-op point is no length at all: shade the break in the axis.
        middle = math.sqrt(noop_x * min(positive))
        axis.axvspan(middle / 1.25, middle * 1.25, color="#dddddd", linewidth=0, zorder=0)
    from matplotlib.ticker import LogLocator

    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    _distinct_labels(axis.yaxis)
    axis.grid(which="major", alpha=0.3)
    axis.set_xlabel("length of one call: ms of pure-Python work (log scale; points nudged "
                    "sideways so that none hides another)", fontsize=8)
    axis.set_ylabel("calls per second (log scale)")
    axis.set_title("Calls per second against call length: higher is better", fontsize=9)
    return drawn, ceiling


def _draw_tiny(axis: Any, results: Results, workload: str, families: List[str]):
    """One row per engine: a stem in its mode's line style, ending in its mode's marker
    at the median time of one batch; returns what it drew, as in :func:`_draw_sweep`."""
    from matplotlib.ticker import LogLocator

    rows = []
    for family in families:
        for mode in SMALL_CALL_MODES:
            cell = results.cell(workload, family, mode)
            if cell is None or mode not in MODE_STYLES:
                continue
            label = "raw: " + (cell.engine or "raw engine") if mode == "raw" \
                else _line_label(results, family, mode)
            rows.append((family, mode, label, cell))
    ys = list(range(len(rows)))[::-1]
    known = [cell.median_seconds for *_, cell in rows if cell.median_seconds]
    floor = min(known) / 3 if known else 0.001
    drawn = []
    for y, (family, mode, _label, cell) in zip(ys, rows):
        style, marker, size, _ = MODE_STYLES[mode]
        colour = _FAMILY_COLOURS.get(family, "black")
        value = cell.median_seconds
        if not value:
            axis.annotate(cell.status if cell.status != "ok" else "—", (floor, y),
                          xytext=(3, 0), textcoords="offset points", va="center",
                          fontsize=7, color="#a00000")
            continue
        noisy = results.rate_noise(cell)
        axis.plot([floor, value], [y, y], linestyle=style, color=colour, linewidth=1.5,
                  marker=marker, markevery=[1], markersize=size,
                  markerfacecolor="white" if noisy else colour, markeredgecolor=colour,
                  gid=f"{family}/{mode}")
        axis.annotate(("~" if noisy else "") + f"{value:.3g} s", (value, y), xytext=(6, 0),
                      textcoords="offset points", va="center", fontsize=7)
        drawn.append((family, mode, bool(noisy)))
    axis.set_xscale("log")
    axis.set_xlim(left=floor, right=(max(known) * 4) if known else 1.0)
    axis.xaxis.set_major_locator(LogLocator(base=10))
    _distinct_labels(axis.xaxis)
    axis.set_yticks(ys)
    axis.set_yticklabels([label for _, _, label, _ in rows], fontsize=7)
    calls = next((c.calls for c in results.cells if c.workload == workload and c.calls), None)
    axis.set_xlabel("seconds (log scale, stems do not start at 0): lower is better", fontsize=8)
    axis.set_title(f"{calls:,} no-op calls: median time of one batch" if calls
                   else workload, fontsize=9)
    axis.grid(axis="x", alpha=0.3)
    return drawn


def _line_label(results: Results, family: str, mode: str) -> str:
    title = FAMILIES[family].title
    if mode == "bulk":
        cell = next((c for c in results.cells if c.family == family and c.mode == "bulk"
                     and c.engine), None)
        return cell.engine if cell else f"{title}'s bulk peer"
    if not FAMILIES[family].batching:
        return title
    return f"{title}, batch_size={'auto' if mode == 'auto' else 1}"


# -- axes ---------------------------------------------------------------------------------------


def _value_axis(axis: Any, values: Sequence[float]) -> bool:
    """Linear from zero, or log when ``values`` span more than LOG_SPAN; True for log."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    positive = [v for v in values if v and v > 0]
    log = bool(positive) and max(positive) / min(positive) > LOG_SPAN
    if log:
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        axis.set_ylim(0, (max(positive) if positive else 1.0) * 1.12)
        axis.yaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=3))
    _distinct_labels(axis.yaxis)
    return log


def _distinct_labels(axis: Any) -> None:
    """Major ticks labelled with the fewest decimals that tell them apart; no minor labels."""
    from matplotlib.ticker import NullFormatter

    axis.set_major_formatter(_DistinctFormatter())
    axis.set_minor_formatter(NullFormatter())


class _DistinctFormatter(Formatter):
    """A tick's value in full, with thousands separators and no needless decimals: the
    labels of two ticks differ whenever the ticks do."""

    def __call__(self, value: float, pos: Optional[int] = None) -> str:
        for decimals in range(13):
            text = f"{value:,.{decimals}f}"
            if abs(float(text.replace(",", "")) - value) <= 1e-9 * max(1.0, abs(value)):
                return text
        return f"{value:,.12g}"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- files --------------------------------------------------------------------------------------


def _save(figure: Any, path: pathlib.Path) -> bool:
    if figure is None:
        return False
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_chart(results: Results, path: pathlib.Path) -> bool:
    """Draw :func:`overhead_figure` into ``path``; False (nothing drawn) without data."""
    return _save(overhead_figure(results), path)


def write_crossover_chart(results: Results, path: pathlib.Path) -> bool:
    """Draw :func:`crossover_figure` into ``path``; False (nothing drawn) without data."""
    return _save(crossover_figure(results), path)


def write_charts(results: Results, output: pathlib.Path) -> List[pathlib.Path]:
    """``results.png`` (runner overhead) and ``crossover.png`` (many small calls), when
    the run has data for them; the paths written."""
    written = []
    for name, draw in (("results.png", write_chart), ("crossover.png", write_crossover_chart)):
        if draw(results, output / name):
            written.append(output / name)
    return written


def chart_and_json(results: Results, output: pathlib.Path) -> List[pathlib.Path]:
    """Write ``results.json`` and the charts the run has data for; the paths written."""
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "results.json"
    write_json(results, json_path)
    return [json_path, *write_charts(results, output)]
