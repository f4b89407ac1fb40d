"""Large values shared by many calls: each worker receives one once while calls use it.

On Parallel, Dask and Ray a value that pickles to ``large_value_bytes`` or more
(default 1 MiB) travels to each worker once, not once per call; each call still
sees it as it was at its submit; workers get read-only arrays; nothing is left once
the block ends. Sequential and Concurrent copy nothing.
"""

from __future__ import annotations

import gc
import glob
import os
import pickle
import threading

import numpy as np
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import flow, task, unmapped
from tests.support.kinds import all_kinds, parametrize_kinds
from tests.support.large_payloads import (
    Counted,
    array_info,
    loads_by_process,
    make_counted,
    same_object,
    size_of,
    write_to,
)

pytestmark = pytest.mark.timeout(240)

REMOTE = [kind for kind in all_kinds() if kind.class_name in ("ParallelTaskRunner", "DaskTaskRunner", "RayTaskRunner")]
LOCAL = [kind for kind in all_kinds() if kind.class_name in ("SequentialTaskRunner", "ConcurrentTaskRunner")]

CALLS = 50
ARRAY = 2 << 20  # float64 items: 16 MiB


def _once_per_process(path: str, kind) -> None:
    counts = loads_by_process(path)
    # Workers in this process (Dask's threads, two of them) take the value as it is,
    # or load it once each; this process also loads an upstream result it settles.
    in_process = not kind.pickles_results
    assert counts or in_process, "no worker loaded the value"
    mine = counts.pop(os.getpid(), 0)
    assert mine <= (2 if in_process else 1), f"loads here: {mine}"
    assert max(counts.values(), default=1) == 1, f"loads by worker process: {counts}"


@parametrize_kinds(REMOTE)
@pytest.mark.parametrize("where", ["direct", "nested"])
def test_a_value_many_calls_take_is_loaded_once_per_worker(driver, kind, tmp_path, where):
    path = str(tmp_path / "loads")
    value = Counted(path)
    argument = value if where == "direct" else {"x": [value]}
    with driver.start():
        # The first call keeps the value in use while the others are submitted, however
        # slowly: a value no pending call holds is released, and shared anew after.
        futures = [driver.submit(size_of, {"value": argument, "pause": 1.5})]
        futures += [driver.submit(size_of, {"value": argument, "pause": 0.02}) for _ in range(CALLS)]
        results = [driver.wait(future).result() for future in futures]
    assert {size for size, _ in results} == {len(value.data)}
    _once_per_process(path, kind)


@parametrize_kinds(REMOTE)
def test_an_upstream_result_many_calls_take_is_loaded_once_per_worker(driver, kind, tmp_path):
    path = str(tmp_path / "loads")
    with driver.start():
        made = driver.submit(make_counted, {"path": path})
        futures = [driver.submit(size_of, {"value": made, "pause": 0.02}) for _ in range(CALLS)]
        results = [driver.wait(future).result() for future in futures]
    assert {size for size, _ in results} == {len(Counted(path).data)}
    _once_per_process(path, kind)


@parametrize_kinds(REMOTE)
def test_a_flow_map_with_unmapped_value_loads_it_once_per_worker(kind, request, tmp_path):
    path = str(tmp_path / "loads")
    value = Counted(path)

    @task
    def measure(value, index):
        return size_of(value, 0.02).result()[0] + index

    @flow(task_runner=kind.make(request, blocking=False))
    def mapped():
        return [future.result() for future in measure.map(unmapped(value), range(CALLS))]

    state = mapped()
    assert state.result() == [len(value.data) + index for index in range(CALLS)]
    _once_per_process(path, kind)


@parametrize_kinds(REMOTE + [kind for kind in LOCAL if kind.id == "sequential"])
def test_each_call_sees_the_array_as_it_was_at_its_submit(driver):
    array = np.ones(ARRAY)
    with driver.start():
        first = driver.submit(array_info, {"array": array})
        array[:] = 2.0
        second = driver.submit(array_info, {"array": array})
        array[:] = 3.0
        third = driver.submit(array_info, {"array": array})
        sums = [driver.wait(future).result()[0] for future in (first, second, third)]
    assert sums == [ARRAY * 1.0, ARRAY * 2.0, ARRAY * 3.0]


@parametrize_kinds(REMOTE)
def test_workers_get_large_arrays_read_only_and_aligned_and_small_ones_as_usual(driver):
    with driver.start():
        large = driver.run(array_info, {"array": np.ones(ARRAY)}).result()
        small = driver.run(array_info, {"array": np.ones(16)}).result()
        state = driver.run(write_to, {"array": np.ones(ARRAY)})
        again = driver.run(array_info, {"array": np.ones(ARRAY)}).result()
    assert large[:2] == (ARRAY * 1.0, False)
    assert small[:2] == (16.0, True)
    assert large[3] and small[3], "a misaligned array"
    assert isinstance(state.data, ValueError) and "read-only" in str(state.data), state
    assert again[0] == ARRAY * 1.0  # the failed write changed nothing


@parametrize_kinds(REMOTE)
def test_below_the_threshold_or_turned_off_values_go_with_each_call(kind, request):
    for large_value_bytes, expect_writable in ((None, True), (64 * ARRAY, True), (1, False)):
        runner = getattr(taskrunners.sync, kind.class_name)(
            **kind.kwargs(request), large_value_bytes=large_value_bytes
        )
        with runner.start():
            state = runner.wait(runner.submit(taskrunners.TaskRun(), array_info, {"array": np.ones(ARRAY)}))
        assert state.result()[1] is expect_writable, (large_value_bytes, state)


@parametrize_kinds(LOCAL)
def test_sequential_and_concurrent_copy_nothing(driver):
    array = np.ones(ARRAY)
    with driver.start():
        state = driver.run(same_object, {"value": array, "registry": [array]})
    assert state.result() is True


def _shared_folders():
    return set(glob.glob(f"/dev/shm/taskrunners-shared-{os.getpid()}-*"))


@parametrize_kinds([kind for kind in REMOTE if kind.class_name == "ParallelTaskRunner"])
def test_parallel_leaves_no_shared_file_after_its_block(kind, request):
    before = _shared_folders()
    # Ends normally.
    runner = kind.make(request, blocking=True)
    with runner.start():
        futures = [runner.submit(taskrunners.TaskRun(), array_info, {"array": np.ones(ARRAY)}) for _ in range(4)]
        assert all(runner.wait(future).is_completed() for future in futures)
    assert _shared_folders() == before
    # Ends with an exception while calls hold shared values.
    runner = kind.make(request, blocking=True)
    with pytest.raises(KeyError):
        with runner.start():
            runner.submit(taskrunners.TaskRun(), size_of, {"value": Counted(os.devnull), "pause": 5})
            assert len(_shared_folders() - before) == 1
            raise KeyError("leave")
    assert _shared_folders() == before
    # A worker killed while it holds a shared value.
    runner = kind.make(request, blocking=True)
    with runner.start():
        state = runner.wait(
            runner.submit(taskrunners.TaskRun(), _exit_holding, {"array": np.ones(ARRAY)})
        )
        assert state.is_crashed(), state
    assert _shared_folders() == before


def _exit_holding(array):
    os._exit(3)


def test_a_released_value_is_gone_from_the_parallel_folder_before_the_block_ends():
    with taskrunners.sync.ParallelTaskRunner(max_workers=2).start() as runner:
        (folder,) = _shared_folders_of(runner)
        future = runner.submit(taskrunners.TaskRun(), array_info, {"array": np.ones(ARRAY)})
        assert runner.wait(future).is_completed()
        del future
        gc.collect()
        assert os.listdir(folder) == []


def _shared_folders_of(runner):
    return [runner._shared.folder]


def _memory_files(token):
    """The unnamed memory files this process has open for the copies of one store."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:  # closed meanwhile
            pass
    return [target for target in found if target.startswith(f"/memfd:taskrunners-{token}-")]


@parametrize_kinds([kind for kind in REMOTE if kind.class_name == "RayTaskRunner"])
def test_ray_keeps_the_object_stores_copy_and_none_of_its_own(kind, request):
    runner = kind.make(request, blocking=True)
    value = Counted(os.devnull)
    with runner.start():
        futures = [runner.submit(taskrunners.TaskRun(), size_of, {"value": value, "pause": 1}) for _ in range(3)]
        assert len(runner._shared) == 1  # held for the calls
        assert _memory_files(runner._shared._token) == []
        assert all(runner.wait(future).is_completed() for future in futures)


@parametrize_kinds([kind for kind in REMOTE if kind.class_name != "ParallelTaskRunner"])
def test_no_copy_outlives_its_block_in_this_process(kind, request):
    # Dask's thread workers run here: what they loaded must not hold a copy open.
    runner = kind.make(request, blocking=True)
    with runner.start():
        token = runner._shared._token
        futures = [runner.submit(taskrunners.TaskRun(), array_info, {"array": np.ones(ARRAY)}) for _ in range(3)]
        assert all(runner.wait(future).is_completed() for future in futures)
    del futures
    gc.collect()
    assert _memory_files(token) == []


@pytest.mark.dask
def test_dask_leaves_no_scattered_key(dask_external_cluster):
    import distributed

    runner = taskrunners.sync.DaskTaskRunner(address=dask_external_cluster.address)
    with runner.start():
        futures = [runner.submit(taskrunners.TaskRun(), array_info, {"array": np.ones(ARRAY)}) for _ in range(3)]
        assert all(runner.wait(future).is_completed() for future in futures)
    with distributed.Client(dask_external_cluster.address) as client:
        keys = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))
    assert not [key for key in keys if str(key).startswith("Payload-")], keys


def test_values_that_cannot_be_shared_fail_as_before():
    lock_holder = {"lock": threading.Lock(), "data": os.urandom(2 << 20)}
    with taskrunners.sync.ParallelTaskRunner(max_workers=2).start() as runner:
        state = runner.wait(runner.submit(taskrunners.TaskRun(), size_of, {"value": lock_holder}))
    assert state.is_crashed() and "pickle" in (state.message or ""), state


@pytest.mark.parametrize("bad", [0, -1, 1.5, "1MB", True])
@pytest.mark.parametrize("name", ["ParallelTaskRunner", "DaskTaskRunner", "RayTaskRunner"])
def test_bad_large_value_bytes_names_the_argument(name, bad):
    for module in (taskrunners.sync, taskrunners):
        with pytest.raises((TypeError, ValueError), match="large_value_bytes"):
            getattr(module, name)(large_value_bytes=bad)


@pytest.mark.parametrize("name", ["ParallelTaskRunner", "DaskTaskRunner", "RayTaskRunner"])
def test_large_value_bytes_is_kept_across_pickling(name):
    for module in (taskrunners.sync, taskrunners):
        runner = getattr(module, name)(large_value_bytes=12345)
        assert pickle.loads(pickle.dumps(runner)).large_value_bytes == 12345
