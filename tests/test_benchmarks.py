"""The benchmark harness works: it measures, interleaves, reports, skips and fails as it should.

Nothing here asserts anything about speed; the numbers only have to exist.
"""

from __future__ import annotations

import io
import json
import os

import pytest

import taskrunners.sync
from benchmarks import charts
from benchmarks.bulk import bulk_engine
from benchmarks.cli import parse_args
from benchmarks.engines import EngineSettings, SyncEngine
from benchmarks.families import FAMILIES, Family, RunnerUnavailable, has_batch_size
from benchmarks.measure import run_sessions
from benchmarks.raw_engines import PlainLoop
from benchmarks.results import FORMAT, NOISE_RULE, Cell, Results, SessionRecord, load_json
from benchmarks.sessions import Config, Contender, Session, plan_sessions
from benchmarks.tables import markdown_tables, render_tables, small_call_rows, table_rows
from benchmarks.workloads import WORKLOAD_GROUPS, WORKLOADS
from taskrunners.states import Completed, Failed
from tests.support import ROOT
from tests.support.processes import run_python

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_WORKLOADS = ("noop", "async-sleep", "tiny", "sweep-0ms", "sweep-1ms")
QUICK_RUNNERS = ("sequential", "parallel")
#: Whether the Parallel runner takes batch_size yet (the auto cells run only then).
PARALLEL_BATCHES = has_batch_size(taskrunners.sync.ParallelTaskRunner)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m benchmarks --quick`` on a small selection, in a subprocess."""
    output = tmp_path_factory.mktemp("bench")
    process = run_python(
        "-m", "benchmarks", "--quick", "--no-peers",
        "--workloads", ",".join(QUICK_WORKLOADS), "--runners", ",".join(QUICK_RUNNERS),
        "--output", output,
        env={**os.environ, "COLUMNS": "200"},
        timeout=150,
    )
    return process, output


def _expected_cells():
    cells = set()
    for workload in QUICK_WORKLOADS:
        for family in QUICK_RUNNERS:
            for mode in WORKLOADS[workload].modes:
                if mode != "prefect" and FAMILIES[family].has_mode(mode):
                    cells.add((workload, family, mode))
    return cells


@pytest.mark.timeout(180)
def test_quick_run_prints_both_tables(quick_run):
    process, _ = quick_run
    assert process.returncode == 0, process.stderr[-3000:]
    out = process.stdout
    for text in ("Runner overhead", "Many small calls", "noop", "async-sleep", "tiny",
                 "sweep-0ms", "sweep-1ms", "Sequential", "Parallel", "loky ProcessPoolExecutor",
                 "await loop", "joblib.Parallel(n_jobs=2)", "auto vs peer", "took turns",
                 "Start-up and shut-down", "crossover.png"):
        assert text in out, text
    if not PARALLEL_BATCHES:
        assert "runner has no batch_size yet" in out


@pytest.mark.timeout(180)
def test_quick_run_writes_every_measurement_mode_and_the_machine(quick_run):
    process, output = quick_run
    assert process.returncode == 0, process.stderr[-3000:]
    data = json.loads((output / "results.json").read_text())
    assert data["format"] == FORMAT
    machine = data["machine"]
    for key in ("cpu_count", "usable_cpus", "platform", "python", "packages",
                "load_average_before", "load_average_after"):
        assert machine[key], key
    assert machine["packages"]["taskrunners"] and machine["packages"]["joblib"]
    config = data["config"]
    assert data["created"] and config["quick"] is True and config["interleaved"] is True
    assert config["batch_size_parameter"]["parallel"]["taskrunners.sync"] is PARALLEL_BATCHES
    assert data["ratio_method"] and set(data["modes"]) >= {"raw", "twin", "auto", "bulk"}
    assert data["workloads"]["tiny"]["kind"] == "tiny"
    assert data["workloads"]["sweep-1ms"]["kwargs"]["iterations"] > 0

    cells = {(c["workload"], c["family"], c["mode"]): c for c in data["cells"]}
    assert set(cells) == _expected_cells()
    for key, cell in cells.items():
        if key[2] == "auto" and not PARALLEL_BATCHES:
            assert cell["status"] == "not run" and cell["note"] == "runner has no batch_size yet"
            continue
        assert cell["status"] == "ok", (key, cell["note"])
        repeats = config["repeats"] if WORKLOADS[key[0]].kind == "classic" else config["long_repeats"]
        assert len(cell["seconds"]) == len(cell["started"]) == repeats
        assert len(cell["warmup_seconds"]) == 1 and cell["warmup_calls"] > 0
        assert cell["calls"] > 0 and cell["calls_per_second"] > 0
        if cell["mode"] in ("twin", "facade"):
            assert cell["overhead_vs_raw"] > 0 and cell["ratios"]["vs_raw"] > 0
    # Every engine of one runner ran in one session; the tiny workload's count is fixed.
    assert len({c["session"] for c in data["cells"] if c["family"] == "parallel"}) == 1
    assert {c["calls"] for c in data["cells"] if c["workload"] == "tiny"} == {500}
    assert cells[("tiny", "parallel", "bulk")]["engine"] == "joblib.Parallel(n_jobs=2)"
    assert cells[("tiny", "parallel", "twin")]["batch_size"] == "1"
    assert cells[("tiny", "parallel", "auto")]["batch_size"] == "auto"
    assert cells[("async-sleep", "sequential", "raw")]["engine"] == "await loop"
    assert cells[("noop", "sequential", "facade")]["engine"] == "taskrunners.SequentialTaskRunner"
    for record in data["sessions"]:
        if record["mode"] == "auto" and not PARALLEL_BATCHES:
            assert record["status"] == "not run"
            continue
        assert record["status"] == "ok", record
        assert record["startup_seconds"] >= 0 and record["shutdown_seconds"] >= 0


@pytest.mark.timeout(180)
def test_quick_run_draws_the_charts_and_redraws_them_from_json(quick_run, tmp_path, capsys):
    process, output = quick_run
    assert process.returncode == 0, process.stderr[-3000:]
    for name in ("results.png", "crossover.png"):
        assert (output / name).read_bytes()[:8] == PNG_SIGNATURE, name

    from benchmarks.cli import main

    assert main(["--from-json", str(output / "results.json"), "--output", str(tmp_path)]) == 0
    for name in ("results.png", "crossover.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE, name
    printed = capsys.readouterr().out
    assert "Runner overhead" in printed and "Many small calls" in printed
    assert main(["--from-json", str(output / "results.json"), "--output", str(tmp_path),
                 "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "| workload | runner |" in markdown and "| **noop** | Sequential |" in markdown
    assert "| **tiny** | Sequential |" in markdown and "| auto vs peer |" in markdown


def test_results_of_the_previous_format_still_load(tmp_path):
    # Part of the reference committed before the small-call workloads (format 1).
    old = ROOT / "tests" / "support" / "benchmark_results_format1.json"
    assert json.loads(old.read_text())["format"] == "taskrunners-benchmarks/1"
    results = load_json(old)
    assert table_rows(results) and not small_call_rows(results)
    assert charts.write_charts(results, tmp_path) == [tmp_path / "results.png"]


def test_the_readme_shows_every_table_of_the_committed_reference():
    # The README's benchmark section is `--from-json benchmarks/reference/results.json
    # --markdown`, pasted whole: a table left out, or numbers from another run, fail.
    reference = load_json(ROOT / "benchmarks" / "reference" / "results.json")
    tables = markdown_tables(reference)
    assert tables.count("| workload | runner |") == 2
    assert tables in (ROOT / "README.md").read_text()


def test_unknown_names_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as raised:
        parse_args(["--runners", "sequential,threads"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "unknown runner 'threads'" in err and "concurrent" in err
    with pytest.raises(SystemExit):
        parse_args(["--workloads", "sweep-3ms"])
    assert "sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])


def test_workload_groups_expand_in_the_order_of_the_workloads():
    assert parse_args(["--workloads", "sweep"]).workloads == list(WORKLOAD_GROUPS["sweep"])
    assert parse_args(["--workloads", "tiny,classic"]).workloads == ["noop", "cpu", "sleep",
                                                                      "async-sleep", "tiny"]
    assert parse_args([]).workloads == [*WORKLOADS, "large"]
    assert [WORKLOADS[name].seconds_per_call for name in WORKLOAD_GROUPS["sweep"]] == [
        0.0, 0.0001, 0.001, 0.01, 0.1
    ]


def test_quick_means_one_repeat_unless_told():
    assert parse_args(["--quick"]).repeats == 1
    assert parse_args(["--quick", "--repeats", "3"]).repeats == 3
    assert parse_args([]).repeats == 5


def _config(**changes):
    values = dict(
        workloads=("noop",), families=("sequential",), repeats=2, quick=True,
        batch_seconds=0.2, batch_timeout=30.0, warmup_calls=4, spin_iterations=1,
        spin_seconds=0.0, engine_settings=EngineSettings(workers=2),
    )
    values.update(changes)
    return Config(**values)


def _session(*contenders, config=None, index=0):
    """A Sequential session on the noop workload, its contenders given as (mode, make_engine)."""
    config = config or _config()
    noop = WORKLOADS["noop"]
    made = []
    for mode, make_engine in contenders:
        cells = {"noop": Cell("noop", "sequential", mode, calls=5, session=index)}
        record = SessionRecord("sequential", mode, workloads=["noop"], session=index)
        made.append(Contender(mode, make_engine, cells, record))
    return Session(index, FAMILIES["sequential"], made, [noop], config)


def _results(sessions, config=None):
    return Results(
        config=(config or _config()).as_dict(), machine={},
        cells=[cell for s in sessions for cell in s.cells],
        sessions=[record for s in sessions for record in s.records],
        created="2026-01-01T00:00:00+00:00",
    )


class Unfinished:
    """A runner class whose constructor is not written yet."""

    def __init__(self, **kwargs):
        raise NotImplementedError("not yet")


def test_a_runner_not_implemented_yet_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(taskrunners.sync, "SequentialTaskRunner", Unfinished)
    settings = EngineSettings(workers=2)
    with pytest.raises(RunnerUnavailable, match="not implemented yet"):
        FAMILIES["sequential"].twin(settings)

    def make_engine():
        return FAMILIES["sequential"].twin(settings)

    session = _session(("twin", make_engine), ("raw", PlainLoop))
    moved = []
    run_sessions([session], lambda text, units: moved.append(units))
    twin, raw = session.contenders
    assert twin.cells["noop"].status == "skipped" and "not implemented yet" in twin.cells["noop"].note
    assert twin.record.status == "skipped"
    assert raw.cells["noop"].status == "ok"  # the other engine of the session still ran
    assert sum(moved) == session.units  # the progress bar still reaches the end


class TakesBatchSize:
    """A runner class with a batch_size argument, as the batching runners will have."""

    def __init__(self, max_workers=None, batch_size="auto"):
        self.max_workers = max_workers
        self.batch_size = batch_size


class LacksBatchSize:
    def __init__(self, max_workers=None):
        self.max_workers = max_workers


def test_batch_size_is_pinned_where_the_runner_has_it_and_auto_is_not_run_where_not(monkeypatch):
    settings = EngineSettings(workers=2)
    parallel = FAMILIES["parallel"]
    assert has_batch_size(TakesBatchSize) and not has_batch_size(LacksBatchSize)
    monkeypatch.setattr(taskrunners.sync, "ParallelTaskRunner", TakesBatchSize)
    assert parallel.twin(settings, batch_size=1).runner.batch_size == 1
    assert parallel.twin(settings, batch_size="auto").runner.batch_size == "auto"
    # Today's runner, one engine task per call, is what batch_size=1 asks for.
    monkeypatch.setattr(taskrunners.sync, "ParallelTaskRunner", LacksBatchSize)
    assert parallel.twin(settings, batch_size=1).runner.max_workers == 2
    with pytest.raises(RunnerUnavailable, match="runner has no batch_size yet") as raised:
        parallel.twin(settings, batch_size="auto")
    assert raised.value.status == "not run"
    # In-process runners have nothing to batch: never an auto or bulk cell.
    assert not FAMILIES["sequential"].has_mode("auto") and not FAMILIES["concurrent"].has_mode("bulk")


def test_the_plan_puts_every_engine_of_a_runner_in_one_session():
    config = _config(workloads=("noop", "tiny", "sweep-1ms"), families=("sequential", "parallel"))
    sessions = plan_sessions(config)
    assert [s.family.key for s in sessions] == ["sequential", "parallel"]
    parallel = sessions[1]
    assert [c.mode for c in parallel.contenders] == ["raw", "twin", "facade", "auto", "map", "bulk"]
    by_mode = {c.mode: c for c in parallel.contenders}
    assert set(by_mode["facade"].cells) == {"noop"}
    assert set(by_mode["auto"].cells) == set(by_mode["bulk"].cells) == {"tiny", "sweep-1ms"}
    assert set(by_mode["map"].cells) == {"tiny"}
    assert {cell.session for cell in parallel.cells} == {1}
    assert [c.mode for c in sessions[0].contenders] == ["raw", "twin", "facade"]


class Recording(SyncEngine):
    """Runs calls in a loop and notes which engine ran each batch, and how long it said it took."""

    def __init__(self, name, log, seconds=None):
        self.name = name
        self.log = log
        self.seconds = seconds

    def run_batch(self, fn, kwargs, calls, timeout):
        self.log.append(self.name)
        return [fn(**kwargs) for _ in range(calls)]


def test_engines_take_turns_and_ratios_are_paired_by_round():
    log = []
    config = _config(repeats=3)
    session = _session(("raw", lambda: Recording("A", log)), ("twin", lambda: Recording("B", log)),
                       config=config)
    run_sessions([session], lambda text, units: None)
    # The first call of each, then the warm-up round, then rounds starting one engine later.
    assert log == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A"]
    raw, twin = (c.cells["noop"] for c in session.contenders)
    assert raw.status == twin.status == "ok"
    assert len(raw.seconds) == len(raw.started) == 3
    assert raw.started == sorted(raw.started)

    # Round by round, twin takes 2x, 2x and 4x the raw time: the paired median is 2;
    # the ratio of the medians (4 s and 1 s) would be 4.
    raw.seconds, twin.seconds = [1.0, 2.0, 1.0], [2.0, 4.0, 4.0]
    results = _results([session], config)
    assert results.overhead(twin, "raw") == pytest.approx(2.0)
    twin.session = 7  # not interleaved: the ratio of the medians
    assert results.overhead(twin, "raw") == pytest.approx(4.0)


class FailingEngine(SyncEngine):
    """Runs calls in a loop; every third one fails."""

    name = "failing"

    def run_batch(self, fn, kwargs, calls, timeout):
        return [
            Failed(message="boom") if i % 3 == 2 else Completed(data=fn(**kwargs).data)
            for i in range(calls)
        ]


def test_calls_that_do_not_complete_fail_the_cell_and_the_exit_status():
    session = _session(("twin", FailingEngine), ("raw", PlainLoop))
    run_sessions([session], lambda text, units: None)
    failing, fine = session.contenders
    cell = failing.cells["noop"]
    assert cell.status == "failed"
    assert "1 of 5 calls did not complete" in cell.note and "boom" in cell.note
    assert cell.calls_per_second is None
    assert fine.cells["noop"].status == "ok"
    results = _results([session])
    assert results.failures == [cell]
    assert "1 of 5 calls did not complete" in _rendered(results)


class BrokenEngine(SyncEngine):
    """Raises from the middle of a session, as a broken runner would."""

    name = "broken"

    def __init__(self):
        self.aborted = None
        self.batches = 0

    def run_batch(self, fn, kwargs, calls, timeout):
        self.batches += 1
        if self.batches > 2:
            raise RuntimeError("the engine broke")
        return [fn(**kwargs) for _ in range(calls)]

    def abort(self, exc):
        self.aborted = exc


def test_an_engine_that_raises_is_aborted_and_the_others_go_on():
    engine = BrokenEngine()
    broken = _session(("raw", lambda: engine), ("twin", PlainLoop))
    later = _session(
        ("twin", lambda: FAMILIES["sequential"].twin(EngineSettings(workers=2))), index=1
    )
    run_sessions([broken, later], lambda text, units: None)
    assert isinstance(engine.aborted, RuntimeError)
    cell = broken.contenders[0].cells["noop"]
    assert cell.status == "failed" and "the engine broke" in cell.note
    assert broken.contenders[0].record.status == "failed"
    assert broken.contenders[1].cells["noop"].status == "ok"  # its turns went on alone
    assert later.contenders[0].cells["noop"].status == "ok"
    assert len(later.contenders[0].cells["noop"].seconds) == 2
    assert "the engine broke" in _rendered(_results([broken, later]))


def _rendered(results):
    from rich.console import Console

    console = Console(width=250, file=io.StringIO())
    render_tables(results, console)
    return console.file.getvalue()


def test_slow_batches_get_fewer_calls_and_the_same_count_per_kind_of_engine():
    config = _config(quick=False, batch_seconds=1.0, workloads=tuple(WORKLOADS))
    sleep, noop, tiny = WORKLOADS["sleep"], WORKLOADS["noop"], WORKLOADS["tiny"]
    sequential, concurrent = FAMILIES["sequential"], FAMILIES["concurrent"]
    parallel, dask = FAMILIES["parallel"], FAMILIES["dask"]
    assert config.calls(noop, sequential) == noop.calls
    assert config.calls(sleep, concurrent) == sleep.calls  # a thread per call: fast
    assert config.calls(sleep, sequential) == 20  # 20 x 50 ms = 1 s
    for mode in ("raw", "twin", "facade"):
        assert config.calls(sleep, parallel, mode) == 40  # 2 workers
    # The tiny workload makes the same number of calls everywhere, however slow.
    assert {config.calls(tiny, dask, mode) for mode in ("raw", "twin", "auto", "bulk")} == {10_000}
    # Batching engines may get more calls than those sending one task per call.
    point = WORKLOADS["sweep-0.1ms"]
    assert config.calls(point, dask, "auto") == config.calls(point, dask, "bulk")
    assert config.calls(point, dask, "auto") > config.calls(point, dask, "twin")
    assert config.calls(point, dask, "twin") == config.calls(point, dask, "raw")
    assert config.repeats_for(tiny) == 2 and _config(repeats=9).repeats_for(tiny) == 3
    # The warm-up takes at most about a quarter of a timed batch.
    assert config.warmup(tiny, dask, "twin", 10_000) < 10_000
    assert config.warmup(noop, sequential, "twin", 2000) == 2000


def test_an_async_engine_keeps_its_lifespan_in_one_task_on_its_own_loop():
    facade = FAMILIES["sequential"].engine("facade", EngineSettings(workers=2), None)
    for _ in range(2):  # the start() block was left: the runner starts again
        facade.open()
        try:
            first = facade.run_batch(WORKLOADS["async-sleep"].run_fn, {"seconds": 0}, 3, 10.0)
            second = facade.run_batch(WORKLOADS["noop"].run_fn, {}, 3, 10.0)
        finally:
            facade.close()
        assert facade.check(first) is None and facade.check(second) is None


def test_a_family_without_a_bulk_peer_is_skipped_not_failed():
    fake = Family("fake", "Fake", "SequentialTaskRunner", raw_plain=lambda s: PlainLoop(),
                  in_process=True, batching=True, bulk="nothing")
    with pytest.raises(RunnerUnavailable, match="no bulk peer"):
        bulk_engine(fake, EngineSettings(workers=2), None)


class SelfDriving(SyncEngine):
    """Runs the session's body inside something of its own, as Prefect's flow does."""

    name = "self-driving"

    def __init__(self):
        self.inside = False
        self.batches_inside = 0

    def drive(self, body, record, give_up):
        self.inside = True
        try:
            body()
        finally:
            self.inside = False

    def run_batch(self, fn, kwargs, calls, timeout):
        self.batches_inside += self.inside
        return [fn(**kwargs) for _ in range(calls)]


def test_a_prefect_session_runs_its_batches_inside_the_peer():
    engine = SelfDriving()
    session = _session(("prefect", lambda: engine))
    assert session.is_prefect
    run_sessions([session], lambda text, units: None)
    (contender,) = session.contenders
    assert contender.cells["noop"].status == "ok" and contender.record.status == "ok"
    assert engine.batches_inside == 1 + 1 + 2  # first call, warm-up, two timed rounds


# -- charts that do not mislead ------------------------------------------------------------------


def _cell(workload, family, mode, seconds, calls=100, engine="engine"):
    return Cell(workload, family, mode, engine=engine, calls=calls, status="ok", session=0,
                seconds=list(seconds))


def _fake_results(cells, workloads, runners, repeats=5):
    return Results(
        config={"workloads": list(workloads), "runners": list(runners), "repeats": repeats,
                "long_repeats": min(repeats, 3), "interleaved": True, "engines": {"workers": 2}},
        machine={}, cells=cells, sessions=[], created="2026-01-01T00:00:00+00:00",
    )


def _tick_labels(axis):
    """The visible tick labels of a matplotlib Axis, major and minor, as drawn."""
    axis.axes.figure.canvas.draw()
    low, high = sorted(axis.get_view_interval())
    return [
        tick.label1.get_text() for tick in axis.get_major_ticks() + axis.get_minor_ticks()
        if tick.label1.get_visible() and tick.label1.get_text()
        and low <= tick.get_loc() <= high
    ]


def _one_runner_sleep():
    # Three engines within 1% of each other: the case whose axis once read "39 39 39 39".
    cells = [_cell("sleep", "parallel", mode, [20 / rate] * 5, calls=20)
             for mode, rate in (("raw", 39.5), ("twin", 39.4), ("facade", 39.3))]
    return _fake_results(cells, ["sleep"], ["parallel"])


def test_chart_ticks_are_distinct_and_axes_start_at_zero_or_say_log():
    figure = charts.overhead_figure(_one_runner_sleep())
    try:
        rates, overheads = figure.axes[0], figure.axes[1]
        for axes in (rates, overheads):
            labels = _tick_labels(axes.yaxis)
            assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
        # Values within a factor of LOG_SPAN: a linear axis from zero.
        assert rates.get_yscale() == "linear" and rates.get_ylim()[0] == 0
        assert "from 0" in rates.get_ylabel()
        # Ratios: a log axis, and its label says where its bars start.
        assert overheads.get_yscale() == "log" and "log scale" in overheads.get_ylabel()
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def test_rates_spanning_decades_get_a_log_axis_that_says_so():
    cells = [_cell("noop", "sequential", "raw", [0.001] * 5, calls=2000),
             _cell("noop", "sequential", "twin", [0.5] * 5, calls=2000)]
    figure = charts.overhead_figure(_fake_results(cells, ["noop"], ["sequential"]))
    try:
        rates = figure.axes[0]
        assert rates.get_yscale() == "log" and "do not start at 0" in rates.get_ylabel()
        labels = _tick_labels(rates.yaxis)
        assert len(set(labels)) == len(labels) >= 2, labels
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def _quick_sweep_point():
    # One round of 4 calls: the twin seems twice as fast as its own engine.
    return [_cell("sweep-100ms", "parallel", "raw", [0.4], calls=4, engine="loky"),
            _cell("sweep-100ms", "parallel", "twin", [0.2], calls=4)]


def test_a_ratio_from_one_round_of_few_calls_is_marked_noisy_in_the_tables():
    results = _fake_results(_quick_sweep_point(), ["sweep-100ms"], ["parallel"], repeats=1)
    (row,) = small_call_rows(results)
    assert row["noisy"]["twin_vs_raw"] == "4 calls × 1 round"
    assert "~ bs=1 ×: 4 calls × 1 round" in row["notes"]
    markdown = markdown_tables(results)
    assert "| ~0.50× |" in markdown and NOISE_RULE in markdown
    assert "~0.50×" in _rendered(results)


def test_a_ratio_whose_rounds_disagree_is_noisy_and_a_steady_one_is_not():
    steady = [_cell("noop", "parallel", "raw", [1.0, 1.1, 1.0, 0.9, 1.0]),
              _cell("noop", "parallel", "twin", [2.0, 2.2, 2.0, 1.8, 2.1])]
    results = _fake_results(steady, ["noop"], ["parallel"])
    assert results.noise(steady[1], steady[0]) is None
    # Load that fell on both engines alike cancels out round by round.
    alike = [_cell("noop", "parallel", "raw", [1.0, 3.0, 1.0]),
             _cell("noop", "parallel", "twin", [2.0, 6.0, 2.0])]
    assert _fake_results(alike, ["noop"], ["parallel"]).noise(alike[1], alike[0]) is None
    wild = [_cell("noop", "parallel", "raw", [1.0, 1.0, 1.0]),
            _cell("noop", "parallel", "twin", [0.5, 1.0, 3.0])]
    results = _fake_results(wild, ["noop"], ["parallel"])
    assert results.noise(wild[1], wild[0]) == "rounds up to 6× apart"
    (row,) = table_rows(results)
    assert row["noisy"]["twin_vs_raw"] and "~ twin ×: rounds up to 6× apart" in row["notes"]
    data = results.as_dict()
    twin = next(c for c in data["cells"] if c["mode"] == "twin")
    assert twin["noisy"]["vs_raw"] == "rounds up to 6× apart" and data["noise_rule"]


def test_a_noisy_ratio_is_hatched_and_faded_in_the_chart_with_a_legend_entry():
    cells = _quick_sweep_point()
    noop = [_cell("noop", "parallel", "raw", [0.4], calls=4),
            _cell("noop", "parallel", "twin", [0.2], calls=4)]
    figure = charts.overhead_figure(_fake_results(noop + cells, ["noop"], ["parallel"], 1))
    try:
        bars = [patch for axes in figure.axes for patch in axes.patches]
        noisy = [bar for bar in bars if bar.get_gid() == "noisy"]
        assert noisy and all(bar.get_hatch() and bar.get_alpha() < 1 for bar in noisy)
        (legend,) = figure.legends
        assert any(text.get_text().startswith("noisy") for text in legend.get_texts())
        labels = [text.get_text() for axes in figure.axes for text in axes.texts]
        assert "~0.50" in labels
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def _crossover_results():
    cells = []
    for workload, ms in (("tiny", 0.0), ("sweep-0ms", 0.0), ("sweep-1ms", 1.0),
                         ("sweep-100ms", 100.0)):
        seconds = 0.5 if ms else 0.05
        for family, modes in (("sequential", ("raw", "twin")), ("concurrent", ("raw", "twin")),
                              ("parallel", ("raw", "twin", "auto", "bulk"))):
            for mode in modes:
                # At 100 ms every engine of a kind runs at the same rate: lines meet.
                rounds = [seconds] * 3 if ms == 100.0 or mode != "auto" else [0.1, 0.05, 0.3]
                cells.append(_cell(workload, family, mode, rounds, calls=10))
    return _fake_results(cells, ["tiny", "sweep-0ms", "sweep-1ms", "sweep-100ms"],
                         ["sequential", "concurrent", "parallel"], repeats=3)


def _series(figure):
    """Every drawn series of a figure: (panel, family, mode, Line2D)."""
    return [
        (panel, *line.get_gid().split("/"), line)
        for panel, axes in enumerate(figure.axes) for line in axes.get_lines()
        if line.get_gid() and "/" in line.get_gid()
    ]


def test_a_line_style_means_one_mode_in_both_crossover_panels():
    import matplotlib.pyplot as plt

    figure = charts.crossover_figure(_crossover_results())
    try:
        series = _series(figure)
        assert {panel for panel, *_ in series} == {0, 1}
        style_of = {}
        for _, _, mode, line in series:
            style_of.setdefault(mode, set()).add((line.get_linestyle(), line.get_marker()))
        assert {"raw", "twin", "auto", "bulk"} <= set(style_of)
        assert all(len(styles) == 1 for styles in style_of.values()), style_of
        linestyles = [next(iter(styles))[0] for styles in style_of.values()]
        assert len(set(linestyles)) == len(linestyles)  # and one mode per line style
        # One legend names each line style; the panels draw no legend of their own.
        assert all(axes.get_legend() is None for axes in figure.axes)
        texts = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
        for mode in style_of:
            assert charts.MODE_STYLES[mode][3] in texts
        assert any(text.startswith("hollow: noisy") for text in texts)
    finally:
        plt.close(figure)


def test_no_crossover_series_hides_another():
    import matplotlib.pyplot as plt

    figure = charts.crossover_figure(_crossover_results())
    try:
        sweep = [(family, mode, line) for panel, family, mode, line in _series(figure) if panel == 0]
        looks = [(line.get_color(), line.get_linestyle(), line.get_marker()) for *_, line in sweep]
        assert len(set(looks)) == len(looks) == 5  # 1 + 1 + 3 series, each its own look
        for i, (family, _mode, line) in enumerate(sweep):
            for other_family, _other_mode, other in sweep[i + 1:]:
                if family != other_family:
                    # Runners are nudged apart: never a point at the same place.
                    assert not set(line.get_xdata()) & set(other.get_xdata())
                else:
                    # One runner's markers nest: different shapes, the smaller on top.
                    assert line.get_marker() != other.get_marker()
                    assert line.get_markersize() != other.get_markersize()
                    small, large = sorted((line, other), key=lambda l: l.get_markersize())
                    assert small.get_zorder() > large.get_zorder()
        # Noisy points (the auto cells' rounds disagree) are drawn hollow over the series.
        sweep_axes = figure.axes[0]
        hollow = [line for line in sweep_axes.get_lines()
                  if not line.get_gid() and line.get_markerfacecolor() == "white"]
        assert hollow
    finally:
        plt.close(figure)


def test_the_large_workload_times_every_runner_beside_its_idiom(tmp_path):
    """``benchmarks.large`` (part of ``python -m benchmarks``): both points, every contender."""
    path = tmp_path / "large.json"
    process = run_python(
        "-m", "benchmarks.large", "--quick", "--runners", "parallel", "--rounds", "1",
        "--json", path, timeout=150,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    data = json.loads(path.read_text())
    contenders = {"plain loop", "Parallel twin", "Parallel flow task.map", "joblib.Parallel"}
    for point in ("sum", "work"):
        assert set(data["seconds"][point]) == contenders
        assert all(len(rounds) == 1 and rounds[0] > 0 for rounds in data["seconds"][point].values())
    assert "x the idiom" in process.stdout
    assert "large" in parse_args([]).workloads


def test_scale_measures_every_way_in_a_fresh_process(tmp_path):
    from benchmarks import scale

    out = tmp_path / "scale.json"
    assert scale.main(["--sizes", "300", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["way"] for row in rows] == list(scale.WAYS)
    assert all(row["calls"] == 300 and row["seconds"] > 0 and row["growth_bytes"] >= 0 for row in rows)


def test_the_timeouts_benchmark_reports_each_stuck_kind(tmp_path):
    # In a process of its own: it leaves a thread blocked on a socket read behind.
    path = tmp_path / "timeouts.json"
    run_python(
        "-m", "benchmarks.timeouts", "--runners", "concurrent", "--calls", "50",
        "--repeats", "1", "--json", str(path), timeout=120, check=True,
    )
    found = json.loads(path.read_text())["runners"]["concurrent"]
    assert found["overhead"]["ratio"] > 0
    assert set(found["stopping"]) == {"sleeping", "busy", "reading"}
    for kind, outcome in found["stopping"].items():
        assert outcome["state"] == "TimedOut", kind
        assert outcome["seconds_after_limit"] < 5, kind
    assert found["stopping"]["busy"]["stopped"] is True
