"""The benchmark harness works: it measures, reports, skips and fails as it should.

Nothing here asserts anything about speed; the numbers only have to exist.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import report
from benchmarks.cli import parse_args
from benchmarks.engines import FAMILIES, EngineSettings, RunnerUnavailable, SyncEngine
from benchmarks.measure import Cell, Config, Session, SessionRecord, run_sessions
from benchmarks.workloads import WORKLOADS
from taskrunners.states import Completed, Failed
from tests.support.processes import run_python

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m benchmarks --quick`` on a small selection, in a subprocess."""
    output = tmp_path_factory.mktemp("bench")
    process = run_python(
        "-m", "benchmarks", "--quick", "--no-peers",
        "--workloads", "noop,async-sleep", "--runners", "sequential,concurrent",
        "--output", output,
        env={**os.environ, "COLUMNS": "200"},
        timeout=90,
    )
    return process, output


@pytest.mark.timeout(120)
def test_quick_run_prints_the_table(quick_run):
    process, _ = quick_run
    assert process.returncode == 0, process.stderr[-3000:]
    out = process.stdout
    assert "Calls per second" in out
    for text in ("noop", "async-sleep", "Sequential", "Concurrent", "ThreadPoolExecutor",
                 "anyio task group", "Start-up and shut-down"):
        assert text in out


@pytest.mark.timeout(120)
def test_quick_run_writes_every_measurement_and_the_machine(quick_run):
    process, output = quick_run
    assert process.returncode == 0, process.stderr[-3000:]
    data = json.loads((output / "results.json").read_text())
    assert data["format"] == report.FORMAT
    machine = data["machine"]
    for key in ("cpu_count", "usable_cpus", "platform", "python", "packages"):
        assert machine[key], key
    assert machine["packages"]["taskrunners"]
    assert data["created"] and data["config"]["quick"] is True
    cells = {(c["workload"], c["family"], c["mode"]): c for c in data["cells"]}
    assert set(cells) == {
        (w, f, m)
        for w in ("noop", "async-sleep")
        for f in ("sequential", "concurrent")
        for m in ("raw", "twin", "facade")
    }
    for key, cell in cells.items():
        assert cell["status"] == "ok", (key, cell["note"])
        assert len(cell["seconds"]) == data["config"]["repeats"]
        assert cell["calls"] > 0 and cell["calls_per_second"] > 0
        if cell["mode"] != "raw":
            assert cell["overhead_vs_raw"] > 0
    assert cells[("async-sleep", "concurrent", "raw")]["engine"] == "anyio task group"
    twin, facade = cells[("noop", "concurrent", "twin")], cells[("noop", "concurrent", "facade")]
    assert twin["engine"] == "taskrunners.sync.ConcurrentTaskRunner"
    assert facade["engine"] == "taskrunners.ConcurrentTaskRunner"
    for session in data["sessions"]:
        assert session["status"] == "ok"
        assert session["startup_seconds"] >= 0 and session["shutdown_seconds"] >= 0


@pytest.mark.timeout(120)
def test_quick_run_draws_the_chart_and_redraws_it_from_json(quick_run, tmp_path, capsys):
    process, output = quick_run
    assert process.returncode == 0, process.stderr[-3000:]
    assert (output / "results.png").read_bytes()[:8] == PNG_SIGNATURE

    from benchmarks.cli import main

    assert main(["--from-json", str(output / "results.json"), "--output", str(tmp_path)]) == 0
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "Calls per second" in capsys.readouterr().out
    assert main(["--from-json", str(output / "results.json"), "--output", str(tmp_path),
                 "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "| workload | runner |" in markdown and "| **noop** | Sequential |" in markdown


def test_unknown_names_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as raised:
        parse_args(["--runners", "sequential,threads"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "unknown runner 'threads'" in err and "concurrent" in err
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])


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


def _session(make_engine, mode="twin", config=None):
    config = config or _config()
    noop = WORKLOADS["noop"]
    cells = {"noop": Cell("noop", "sequential", mode, calls=5)}
    record = SessionRecord("sequential", mode, workloads=["noop"])
    return Session(FAMILIES["sequential"], mode, make_engine, [noop], cells, record, config)


class Unfinished:
    """A runner class whose constructor is not written yet."""

    def __init__(self, **kwargs):
        raise NotImplementedError("not yet")


def test_a_runner_not_implemented_yet_is_skipped_with_a_note():
    settings = EngineSettings(workers=2)
    with pytest.raises(RunnerUnavailable, match="Unfinished|not implemented yet"):
        FAMILIES["sequential"]._construct(Unfinished, settings)

    def make_engine():
        return FAMILIES["sequential"]._construct(Unfinished, settings)

    session = _session(make_engine)
    moved = []
    run_sessions([session], lambda text, units: moved.append(units))
    cell = session.cells["noop"]
    assert cell.status == "skipped" and "not implemented yet" in cell.note
    assert session.record.status == "skipped"
    assert sum(moved) == session.units  # the progress bar still reaches the end


class FailingEngine(SyncEngine):
    """Runs calls in a loop; every third one fails."""

    name = "failing"

    def run_batch(self, fn, kwargs, calls, timeout):
        return [
            Failed(message="boom") if i % 3 == 2 else Completed(data=fn(**kwargs).data)
            for i in range(calls)
        ]


def test_calls_that_do_not_complete_fail_the_cell_and_the_exit_status():
    session = _session(FailingEngine)
    run_sessions([session], lambda text, units: None)
    cell = session.cells["noop"]
    assert cell.status == "failed"
    assert "1 of 5 calls did not complete" in cell.note and "boom" in cell.note
    assert cell.calls_per_second is None
    results = report.Results(
        config=_config().as_dict(), machine={}, cells=[cell], sessions=[session.record],
        created="2026-01-01T00:00:00+00:00",
    )
    assert results.failures == [cell]


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


def test_an_engine_that_raises_is_aborted_and_the_run_goes_on():
    engine = BrokenEngine()
    broken = _session(lambda: engine)
    fine = _session(lambda: FAMILIES["sequential"].twin(EngineSettings(workers=2)))
    run_sessions([broken, fine], lambda text, units: None)
    assert isinstance(engine.aborted, RuntimeError)
    assert broken.cells["noop"].status == "failed"
    assert "the engine broke" in broken.cells["noop"].note
    assert broken.record.status == "failed"
    assert fine.cells["noop"].status == "ok" and len(fine.cells["noop"].seconds) == 2


def test_slow_batches_get_fewer_calls_and_the_same_count_in_every_mode():
    config = _config(quick=False, batch_seconds=1.0, workloads=tuple(WORKLOADS))
    sleep, noop = WORKLOADS["sleep"], WORKLOADS["noop"]
    sequential, concurrent = FAMILIES["sequential"], FAMILIES["concurrent"]
    assert config.calls(noop, sequential) == noop.calls
    assert config.calls(sleep, concurrent) == sleep.calls  # a thread per call: fast
    assert config.calls(sleep, sequential) == 20  # 20 x 50 ms = 1 s
    for mode in ("raw", "twin", "facade"):
        assert config.calls(sleep, FAMILIES["parallel"], mode) == 40  # 2 workers
