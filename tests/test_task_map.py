"""A flow's ``task.map``: its runs' names and ids, and maps longer than one part.

A map submits its runs part by part (``_task_runs.MAP_PART`` at a time) and names
them cheaply (``seam.numbered_runs``): each run still has the readable name and a
unique id, and reads, compares, hashes and pickles as any TaskRun.
"""

from __future__ import annotations

import copy
import os
import pickle
import uuid

import cloudpickle
import pytest

from taskrunners import ParallelTaskRunner, SequentialTaskRunner, TaskRun, flow, task, unmapped
from taskrunners._core import seam
from taskrunners._task_runs import MAP_PART
from tests.support.large_payloads import Counted, loads_by_process, size_of

pytestmark = pytest.mark.timeout(240)


@task
def add(x, y):
    return x + y


def test_a_mapped_run_reads_compares_hashes_and_pickles_as_a_task_run():
    runs = seam.numbered_runs("load", 7, 600)
    assert [run.name for run in runs[:2]] + [runs[-1].name] == ["load-7", "load-8", "load-606"]
    assert len({run.id for run in runs}) == 600 and len(set(runs)) == 600
    run = runs[300]
    assert isinstance(run, TaskRun) and isinstance(run.id, uuid.UUID)
    assert run.id.version == 4 and run.id.variant == uuid.RFC_4122
    assert repr(run) == f"TaskRun(name='load-307', id={run.id!r})"
    assert run == TaskRun(name="other", id=run.id) and hash(run) == hash(TaskRun(id=run.id))
    assert run != runs[301]
    for copied in (
        pickle.loads(pickle.dumps(run)),
        cloudpickle.loads(cloudpickle.dumps(run)),
        copy.copy(run),
        copy.deepcopy(run),
    ):
        assert type(copied) is TaskRun
        assert (copied.name, copied.id) == ("load-307", run.id)
        assert copied == run and hash(copied) == hash(run)
    run.name = "renamed"
    given = uuid.uuid4()
    run.id = given
    assert (run.name, run.id) == ("renamed", given)
    assert run == TaskRun(id=given) and run != runs[299]
    assert pickle.loads(pickle.dumps(run)).name == "renamed"
    assert runs[299].name == "load-306"  # the others keep theirs


@pytest.mark.parametrize("runner_class", [SequentialTaskRunner, ParallelTaskRunner])
def test_mapped_runs_are_numbered_in_a_row_after_and_before_single_runs(runner_class):
    count = MAP_PART + 100  # more than one part

    runner = runner_class(max_workers=2) if runner_class is ParallelTaskRunner else runner_class()

    @flow(task_runner=runner)
    def test_flow():
        first = add(0, 0)
        mapped = add.map(range(count), unmapped(1))
        last = add(0, 0)
        runs = [future.task_run for future in [first, *mapped, last]]
        return runs, len({*mapped}), [future.result() for future in mapped]

    runs, distinct_futures, results = test_flow().result()
    assert [run.name for run in runs] == [f"add-{n}" for n in range(count + 2)]
    assert len({run.id for run in runs}) == count + 2 and distinct_futures == count
    assert results == [n + 1 for n in range(count)]


def test_a_long_map_over_a_generator_and_by_keyword_gives_every_result_in_order():
    count = 2 * MAP_PART + 10

    @flow(task_runner=ParallelTaskRunner(max_workers=2))
    def test_flow():
        squares = add.map((n * n for n in range(count)), unmapped(0))
        sums = add.map(x=list(range(count)), y=tuple(range(count)))
        return [f.result() for f in squares], [f.result() for f in sums]

    squares, sums = test_flow().result()
    assert squares == [n * n for n in range(count)]
    assert sums == [2 * n for n in range(count)]


def test_a_value_shared_by_every_part_of_a_map_goes_to_each_worker_once(tmp_path):
    path = str(tmp_path / "loads")
    value = Counted(path)

    @task
    def measure(value, index):
        return size_of(value).result()[0] + index

    @flow(task_runner=ParallelTaskRunner(max_workers=2))
    def mapped():
        return [future.result() for future in measure.map(unmapped(value), range(MAP_PART + 50))]

    assert mapped().result() == [len(value.data) + index for index in range(MAP_PART + 50)]
    counts = loads_by_process(path)
    counts.pop(os.getpid(), None)
    assert counts and max(counts.values()) == 1, f"loads by worker process: {counts}"
