"""The dispatcher that gathers calls into batches, on its own (no engine).

Every runner that batches passes the standard suite with ``batch_size="auto"`` and
``1``; these tests pin the rules the dispatcher itself keeps.
"""

from __future__ import annotations

import pytest

from taskrunners._core.batching import (
    MAX_CALLS,
    TARGET_SECONDS,
    Dispatcher,
    Durations,
    Entry,
    batch_key_of,
    check_batch_size,
)
from taskrunners._core.calls import Call


def task_a():
    pass


def task_b():
    pass


class Recorder:
    """Stands in for the engine: keeps the batches sent; the test says when one is done."""

    def __init__(self, limit, batch_size="auto"):
        self.batches = []
        self.dispatcher = Dispatcher(limit, self.batches.append, Durations(batch_size))

    def submit(self, key=task_a, options=None):
        call = Call()
        self.dispatcher.submit(Entry(call, key, options, None))
        return call

    def calls_of(self, batch_index):
        return [entry.call for entry in self.batches[batch_index]]


@pytest.mark.parametrize("value", ["auto", 1, 7])
def test_batch_size_accepts_auto_and_positive_integers(value):
    assert check_batch_size(value) == value


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "big", None, "AUTO"])
def test_batch_size_refuses_anything_else_naming_the_fix(value):
    with pytest.raises(ValueError, match=r'`batch_size` must be "auto" or a positive integer, got'):
        check_batch_size(value)


def test_calls_go_at_once_while_there_is_room_then_gather():
    engine = Recorder(limit=2)
    first, second = engine.submit(), engine.submit()
    assert [len(batch) for batch in engine.batches] == [1, 1]
    gathered = [engine.submit() for _ in range(5)]
    assert len(engine.batches) == 2 and engine.dispatcher.gathered == 5
    assert engine.calls_of(0) == [first] and engine.calls_of(1) == [second]
    assert all(not call.done() for call in gathered)


def test_a_new_task_goes_alone_until_its_calls_are_measured():
    engine = Recorder(limit=1)
    engine.submit()
    for _ in range(10):
        engine.submit()
    engine.dispatcher.task_done()
    assert len(engine.batches[1]) == 1  # nothing measured yet
    engine.dispatcher.durations.record(task_a, seconds=0.001, calls=1)
    engine.dispatcher.task_done()
    assert len(engine.batches[2]) == 9  # all that waits: 1 ms calls go by the hundred


@pytest.mark.parametrize(
    "seconds_per_call, size",
    [(0.000001, MAX_CALLS), (0.001, 100), (0.01, 10), (TARGET_SECONDS, 1), (1.0, 1)],
)
def test_auto_size_follows_how_long_calls_take(seconds_per_call, size):
    durations = Durations("auto")
    durations.record(task_a, seconds=seconds_per_call * 4, calls=4)
    assert durations.size(task_a) == size
    assert durations.size(task_b) == 1


def test_a_fixed_size_is_kept_whatever_calls_take():
    durations = Durations(3)
    assert durations.size(task_a) == 3
    durations.record(task_a, seconds=10.0, calls=1)
    assert durations.size(task_a) == 3


def test_a_burst_is_shared_between_the_engine_tasks_that_may_be_out():
    engine = Recorder(limit=4)
    engine.dispatcher.durations.record(task_a, seconds=0.00001, calls=10)
    for _ in range(4 + 40):
        engine.submit()
    engine.dispatcher.task_done()
    # 40 wait and 4 engine tasks may be out: a batch takes its share, 10, not all 40.
    assert len(engine.batches[4]) == 10


def test_tasks_and_options_never_share_a_batch_and_groups_take_turns():
    engine = Recorder(limit=1, batch_size=10)
    engine.submit()
    a = [engine.submit(task_a) for _ in range(3)]
    b = [engine.submit(task_b) for _ in range(3)]
    a_big = [engine.submit(task_a, options=("num_cpus", 2)) for _ in range(3)]
    for _ in range(3):
        engine.dispatcher.task_done()
    assert [engine.calls_of(n) for n in (1, 2, 3)] == [a, b, a_big]


def test_a_call_somebody_waits_for_is_sent_at_once_with_those_before_it():
    engine = Recorder(limit=1, batch_size=3)
    engine.submit()
    gathered = [engine.submit() for _ in range(6)]
    engine.dispatcher.expedite(gathered[4])
    assert engine.calls_of(1) == [gathered[4], gathered[0], gathered[1]]
    assert engine.dispatcher.out == 2 and engine.dispatcher.gathered == 3
    engine.dispatcher.expedite(gathered[0])  # sent already: nothing to do
    assert len(engine.batches) == 2


def test_cancelled_gathered_calls_are_dropped_and_the_rest_dropped_on_exit():
    engine = Recorder(limit=1, batch_size=10)
    engine.submit()
    gathered = [engine.submit() for _ in range(4)]
    assert gathered[1].cancel() and gathered[2].cancel()
    engine.dispatcher.task_done()
    assert engine.calls_of(1) == [gathered[0], gathered[3]]
    more = [engine.submit() for _ in range(2)]
    assert [entry.call for entry in engine.dispatcher.drop_gathered()] == more
    assert engine.dispatcher.gathered == 0


class Wrapper:
    def __batch_key__(self, run_kwargs):
        return run_kwargs["task"]


def test_the_batch_key_is_the_run_fn_or_the_task_it_names():
    assert batch_key_of(task_a, {}) is task_a
    assert batch_key_of(Wrapper(), {"task": task_b}) is task_b
    assert batch_key_of(Wrapper(), {}) is not task_b  # a key that fails: the run_fn


def test_tasks_that_are_not_weak_referenceable_are_remembered_too():
    durations = Durations("auto")
    durations.record(pow, seconds=0.001, calls=1)
    assert durations.size(pow) == 100


def test_many_calls_at_once_fill_the_room_then_gather():
    engine = Recorder(limit=3, batch_size=10)
    calls = [Call() for _ in range(20)]
    engine.dispatcher.submit_many([Entry(call, task_a, None, None) for call in calls])
    assert [len(batch) for batch in engine.batches] == [1, 1, 1]
    assert engine.dispatcher.gathered == 17
    engine.dispatcher.task_done()
    assert engine.calls_of(3) == calls[3:9]  # its share: 17 waiting over 3 places
