"""RunnerExecutor.map and amap: the standard library's map, in chunks, on every runner."""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import time

import pytest

from taskrunners import TaskConcurrencyType
from taskrunners.compat.futures import RunnerExecutor
from taskrunners.sync import SequentialTaskRunner
from tests.support.kinds import all_kinds, parametrize_kinds
from tests.support.map_payloads import calls_recorded, fail_at, identity, record_call, where
from tests.support.payloads import async_double, divide
from tests.support.processes import run_python
from tests.support.waiting import wait_for_path

pytestmark = pytest.mark.timeout(300)

NOT_SEQUENTIAL = parametrize_kinds(
    k for k in all_kinds() if k.concurrency_type is not TaskConcurrencyType.SEQUENTIAL
)


@pytest.fixture
def executor(kind, request):
    executor = RunnerExecutor(kind.make(request, blocking=True))
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize("runner_form", ["twin", "facade"])
@pytest.mark.parametrize("chunksize", [None, 1, 3])
def test_values_in_order_with_zip_semantics(kind, request, runner_form, chunksize):
    with RunnerExecutor(kind.make(request, blocking=runner_form == "twin")) as executor:
        numbers = list(range(1, 41))
        assert list(executor.map(divide, numbers, [2] * 40, chunksize=chunksize)) == [
            n / 2 for n in numbers
        ]
        # Several iterables of different lengths: as zip, the shortest ends the map.
        assert list(executor.map(divide, numbers, [1, 2, 4], chunksize=chunksize)) == [1, 1, 0.75]
        assert list(executor.map(divide, [], [], chunksize=chunksize)) == []
        assert list(executor.map(identity, iter(()), chunksize=chunksize, buffersize=2)) == []
        assert list(executor.map(async_double, range(5), chunksize=chunksize)) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("chunksize", [None, 2, 10])
def test_an_exception_is_raised_when_its_item_is_reached(executor, chunksize):
    results = executor.map(fail_at, range(10), [4] * 10, timeout=120, chunksize=chunksize)
    # The items before the failing one come first, even those in its chunk.
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError) as raised:
        next(results)
    assert raised.value.args == (4,)
    with pytest.raises(StopIteration):
        next(results)


def test_sizes_are_checked_as_the_standard_library_does():
    with RunnerExecutor(SequentialTaskRunner()) as executor:
        for buffersize in ("foo", 2.0):
            with pytest.raises(TypeError, match="buffersize must be an integer or None"):
                executor.map(identity, range(4), buffersize=buffersize)
        for buffersize in (0, -1):
            with pytest.raises(ValueError, match="buffersize must be None or > 0"):
                executor.map(identity, range(4), buffersize=buffersize)
        for chunksize in (0, -1):
            with pytest.raises(ValueError, match="chunksize must be >= 1"):
                executor.map(identity, range(4), chunksize=chunksize)
        with pytest.raises(TypeError, match="chunksize must be an integer or None"):
            executor.map(identity, range(4), chunksize=2.0)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.map(identity, range(4))


def test_an_int_chunksize_runs_its_items_together(executor):
    # A chunk is one runner call: its items run one after another in one thread.
    places = list(executor.map(where, range(12), chunksize=4, timeout=120))
    for start in range(0, 12, 4):
        assert len(set(places[start : start + 4])) == 1
    assert len(set(executor.map(where, range(6), chunksize=6, timeout=120))) == 1


@NOT_SEQUENTIAL
def test_timeout_counts_from_the_map_call(executor, tmp_path):
    start = time.monotonic()
    results = executor.map(
        record_call, [str(tmp_path)] * 2, [0, 1], [0.0, 30.0], timeout=2, chunksize=1
    )
    assert next(results) == 0
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    assert 1.5 < time.monotonic() - start < 20
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("chunksize", [None, 1, 2])
def test_buffersize_stops_reading_an_endless_iterable(executor, chunksize):
    pulled = []

    def endless():
        for value in itertools.count():
            pulled.append(value)
            yield value

    buffersize = 4
    results = executor.map(identity, endless(), chunksize=chunksize, buffersize=buffersize)
    # Items (chunksize None) or chunks (an int) submitted ahead: at most the buffer.
    ahead = buffersize * (chunksize or 1)
    assert len(pulled) <= ahead
    for expected in range(25):
        assert next(results) == expected
        # Before each value, one more goes out, as in the standard library.
        assert len(pulled) <= expected + 1 + ahead + (chunksize or 1)
    results.close()


@pytest.mark.parametrize("leave", ["close", "drop"])
def test_leaving_early_cancels_the_items_not_started(kind, request, tmp_path, leave):
    executor = RunnerExecutor(kind.make(request, blocking=True))
    buffersize = 4
    results = executor.map(
        record_call,
        itertools.repeat(str(tmp_path)),
        itertools.count(),
        itertools.repeat(0.05),
        chunksize=1,
        buffersize=buffersize,
    )
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    if leave == "close":
        results.close()
    else:
        del results
        gc.collect()
    executor.shutdown(wait=True)
    ran = calls_recorded(tmp_path)
    # The three taken, the buffer behind them and the one sent before the third.
    assert ran == list(range(len(ran))) and 3 <= len(ran) <= 3 + buffersize + 1


@NOT_SEQUENTIAL
def test_leaving_early_without_a_buffer_cancels_the_rest(executor, tmp_path):
    count = 400
    results = executor.map(
        record_call, [str(tmp_path)] * count, range(count), [0.02] * count, chunksize=1
    )
    assert next(results) == 0
    results.close()
    executor.shutdown(wait=True)
    assert 1 <= len(calls_recorded(tmp_path)) < count // 2


@NOT_SEQUENTIAL
def test_shutdown_cancel_futures_cancels_the_items_not_started(executor, tmp_path):
    count = 400
    results = executor.map(
        record_call, [str(tmp_path)] * count, range(count), [0.05] * count, chunksize=1
    )
    wait_for_path(tmp_path / "0", patience=120)
    executor.shutdown(wait=True, cancel_futures=True)
    ran = calls_recorded(tmp_path)
    assert 1 <= len(ran) < count // 2
    values = []
    with pytest.raises(concurrent.futures.CancelledError):
        for value in results:
            values.append(value)
    assert values == list(range(len(values))) and len(values) <= len(ran)


@pytest.mark.anyio
@pytest.mark.parametrize("runner_form", ["twin", "facade"])
async def test_amap_on_asyncio_and_trio(kind, request, runner_form, tmp_path, anyio_backend):
    with RunnerExecutor(kind.make(request, blocking=runner_form == "twin")) as executor:
        values = [value async for value in executor.amap(divide, range(20), [2] * 20)]
        assert values == [n / 2 for n in range(20)]
        # Coroutine functions too, also on a runner that runs them on a loop of its own
        # in this process while the caller runs trio.
        assert [v async for v in executor.amap(async_double, [1, 2], chunksize=1)] == [2, 4]
        got = []
        with pytest.raises(ValueError):
            async for value in executor.amap(fail_at, range(10), [3] * 10, chunksize=2):
                got.append(value)
        assert got == [0, 1, 2]
        results = executor.amap(
            record_call,
            itertools.repeat(str(tmp_path)),
            itertools.count(),
            itertools.repeat(0.05),
            chunksize=1,
            buffersize=2,
        )
        async for value in results:
            if value == 2:
                break
        await results.aclose()
    ran = calls_recorded(tmp_path)
    assert ran == list(range(len(ran))) and 3 <= len(ran) <= 3 + 2 + 1


@pytest.mark.parametrize(
    "runner_class", ["SequentialTaskRunner", "ConcurrentTaskRunner", "ParallelTaskRunner"]
)
def test_ctrl_c_cancels_the_items_not_started(runner_class, tmp_path):
    done = run_python(
        "-m", "tests.support.map_interrupt_script", runner_class, tmp_path, timeout=240, check=True
    )
    assert "interrupted" in done.stdout, done.stderr
    ran = calls_recorded(tmp_path)
    # 200 items of 0.2 s each: those past the few in flight at the Ctrl-C never ran.
    assert ran == list(range(len(ran))) and 4 <= len(ran) < 20, done.stdout
