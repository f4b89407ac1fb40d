"""Timeouts, the behaviour every runner shares: a call past its limit is TimedOut, seen
about a second after the limit, and its work is stopped; calls within their limit,
queued calls and the other calls of a batch are untouched."""

from __future__ import annotations

import os
import socket
import time

import pytest

from taskrunners import TaskRun
from taskrunners.states import StateType
from tests.support import stuck

pytestmark = pytest.mark.timeout(180)

LIMIT = 1.0
# From the limit to the State, at most: "about a second", with room for a loaded
# machine and for a worker that must start first.
SLACK = 8.0


def is_timed_out(state, name=None):
    assert state is not None
    assert state.type is StateType.FAILED, state
    assert state.name == "TimedOut", state
    assert f"{LIMIT:g} s" in state.message
    if name is not None:
        assert repr(name) in state.message
    with pytest.raises(TimeoutError):
        state.result()
    return True


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections and never writes to them."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def _gone(pid, within):
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# The runners that end a stuck call's worker process (the pid is gone after).
KILLS_ITS_WORKER = ("parallel", "ray")


@pytest.mark.parametrize("stuck_kind", ["sleeping", "busy", "reading"])
def test_a_stuck_call_times_out_and_its_work_stops(driver, kind, tmp_path, silent_port, stuck_kind):
    counter = str(tmp_path / "counter")
    run_fn = getattr(stuck, stuck_kind)
    kwargs = {"counter": counter, "port": silent_port} if stuck_kind == "reading" else {"counter": counter}
    if stuck_kind == "sleeping":
        kwargs["seconds"] = 2.5
    task_run = TaskRun(name=f"stuck-{stuck_kind}")
    with driver.start():
        begun = time.monotonic()
        future = driver.submit(run_fn, kwargs, task_run=task_run, timeout_seconds=LIMIT)
        state = driver.wait(future, timeout=LIMIT + SLACK + 30)
        elapsed = time.monotonic() - begun
        assert is_timed_out(state, task_run.name)
        assert elapsed < LIMIT + SLACK + 10, elapsed  # worker start-up included
        # The runner goes on: a call after it completes.
        assert driver.run(stuck.quick, {"value": 7}).result() == 7
        if stuck_kind == "busy":
            seen = stuck.count(counter)
            time.sleep(0.6)
            assert stuck.count(counter) <= seen + 1  # one bump may have been on its way
        if stuck_kind == "sleeping":  # the bump after the sleep never comes
            started = os.path.getmtime(stuck.pid_file(counter))  # when the call began
            time.sleep(max(0.0, started + 2.5 + 0.3 - time.time()))
            assert stuck.count(counter) == 1
        if kind.id.split("-")[0] in KILLS_ITS_WORKER:
            pid = int(open(stuck.pid_file(counter)).read())
            assert _gone(pid, within=10), f"worker {pid} still runs"


def test_a_coroutine_call_past_its_limit_is_cancelled(driver, tmp_path):
    counter = str(tmp_path / "counter")
    with driver.start():
        future = driver.submit(stuck.asleep, {"counter": counter, "seconds": 4.0}, timeout_seconds=LIMIT)
        state = driver.wait(future, timeout=LIMIT + SLACK + 30)
        assert is_timed_out(state)
        time.sleep(0.5)
    assert stuck.count(counter) == 1


def test_a_call_within_its_limit_completes(driver):
    with driver.start():
        futures = [driver.submit(stuck.quick, {"value": n}, timeout_seconds=30) for n in range(20)]
        assert [driver.wait(future).result() for future in futures] == list(range(20))


def test_a_queued_call_is_not_timed_out_by_the_calls_before_it(driver, tmp_path):
    # Six calls of 0.6 s with a limit of 1.5 s: on two workers the last ones start
    # about 1.8 s after submit, which a clock started at submit would count.
    with driver.start():
        futures = [
            driver.submit(stuck.nap_then, {"value": n, "seconds": 0.6}, timeout_seconds=1.5)
            for n in range(6)
        ]
        states = [driver.wait(future) for future in futures]
    assert [state.result() for state in states] == list(range(6))


def test_the_calls_batched_with_a_timed_out_call_run_once_each(driver, tmp_path):
    # One run_fn and one limit for all: the remote runners may gather them in one batch.
    counters = [str(tmp_path / f"counter-{n}") for n in range(12)]
    with driver.start():
        futures = [
            driver.submit(
                stuck.busy_if,
                {"value": n, "counter": counters[n], "stuck": n == 3},
                timeout_seconds=LIMIT,
            )
            for n in range(12)
        ]
        states = [driver.wait(future) for future in futures]
    for n, state in enumerate(states):
        if n == 3:
            assert is_timed_out(state)
        else:
            assert state.result() == n
            assert stuck.count(counters[n]) == 1, f"call {n} ran {stuck.count(counters[n])} times"


@pytest.mark.parametrize(
    "value, error",
    [(0, ValueError), (-1, ValueError), (float("nan"), ValueError), ("1", TypeError), (True, TypeError)],
)
def test_a_bad_limit_is_refused_at_submit_naming_the_argument(driver, value, error):
    with driver.start():
        with pytest.raises(error, match="timeout_seconds"):
            driver.submit(stuck.quick, {"value": 1}, timeout_seconds=value)
