"""DaskTaskRunner timeouts, what only Dask does: a call blocked in C past its limit is
reported by its worker and TimedOut about a second after the limit; its worker is
restarted on a process cluster the runner created, never on one it did not (a
warning says so; on a threads cluster its thread leaves the worker's pool); the
other calls of its batch each run once.

The shared behaviour (every stuck kind, every mode) is in tests/test_timeouts.py.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

import cloudpickle
import pytest

import taskrunners.sync
from taskrunners import TaskRun
from taskrunners.states import Completed, State, StateType
from taskrunners._core.seam import call_of
from tests.support import stuck
from tests.support.kinds_dask import PROCESSES_CLUSTER, THREADS_CLUSTER
from tests.support.waiting import holds_within

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.dask, pytest.mark.timeout(180)]

# The payload below travels by value, as the support modules' do.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SyncDask = taskrunners.sync.DaskTaskRunner
LIMIT = 1.0
# "About a second after the limit", with room for a loaded machine.
SLACK = 6.0
LOGGER = "task_runner.dask"


def read_if(value: int, counter: str, port: int, nap: float = 0.0, stuck_here: bool = False) -> State:
    """Count this call, nap ``nap`` s, then return ``value``, or, if ``stuck_here``,
    block reading a socket whose peer never writes."""
    stuck.bump(counter)
    if stuck_here:
        with open(stuck.pid_file(counter), "w") as file:
            file.write(str(os.getpid()))
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.recv(1)
    time.sleep(nap)
    return Completed(data=value)


def meet(directory: str, name: str, patience: float = 20.0) -> State:
    """Say this call runs (a file named ``name``), then wait for another to say so:
    whether two calls ran at once."""
    open(os.path.join(directory, name), "w").close()
    end = time.monotonic() + patience
    while time.monotonic() < end:
        if len(os.listdir(directory)) >= 2:
            return Completed(data=True)
        time.sleep(0.02)
    return Completed(data=False)


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections and never writes to them."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def is_timed_out(state, name):
    assert state.type is StateType.FAILED, state
    assert state.name == "TimedOut", state
    assert repr(name) in state.message and f"{LIMIT:g} s" in state.message
    with pytest.raises(TimeoutError):
        state.result()
    return True


def is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pids(runner):
    return set(runner._client.run(os.getpid).values())


def timed_out_reading(runner, tmp_path, port):
    """Submit a reading call with a limit; (its State, seconds from the limit to
    the State, the pid of its worker)."""
    counter = str(tmp_path / "counter")
    task_run = TaskRun(name="stuck-reading")
    future = runner.submit(task_run, stuck.reading, {"counter": counter, "port": port}, timeout_seconds=LIMIT)
    assert holds_within(lambda: os.path.exists(stuck.pid_file(counter)) and stuck.count(counter), 60)
    started = time.monotonic()  # the call started a moment before: its limit is no later
    state = runner.wait(future, timeout=LIMIT + SLACK + 30)
    after_limit = time.monotonic() - started - LIMIT
    assert is_timed_out(state, task_run.name)
    return state, after_limit, int(open(stuck.pid_file(counter)).read())


def test_a_call_blocked_in_c_on_an_owned_process_cluster_restarts_its_worker(tmp_path, silent_port, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with SyncDask(cluster_kwargs=dict(PROCESSES_CLUSTER)).start() as runner:
        before = worker_pids(runner)
        _, after_limit, pid = timed_out_reading(runner, tmp_path, silent_port)
        assert after_limit < SLACK, after_limit
        assert pid in before
        assert holds_within(lambda: not is_alive(pid), 30), f"worker {pid} still runs"
        runner._client.wait_for_workers(2, timeout=60)
        after = worker_pids(runner)
        assert len(after) == 2 and pid not in after
        assert runner.wait(runner.submit(TaskRun(), stuck.quick, {"value": 5})).result() == 5
    assert not [record for record in caplog.records if record.name == LOGGER]


def test_a_call_blocked_in_c_on_an_external_cluster_is_timed_out_with_a_warning_and_no_restart(
    dask_external_cluster, tmp_path, silent_port, caplog
):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with SyncDask(address=dask_external_cluster.address).start() as runner:
        before = worker_pids(runner)
        _, after_limit, pid = timed_out_reading(runner, tmp_path, silent_port)
        assert after_limit < SLACK, after_limit
        warnings = [record.getMessage() for record in caplog.records if record.name == LOGGER]
        assert any("stuck-reading" in message and "may still be running" in message for message in warnings)
        # The other worker takes the next call; the stuck one is not restarted.
        assert runner.wait(runner.submit(TaskRun(), stuck.quick, {"value": 5})).result() == 5
        time.sleep(1.0)
        assert is_alive(pid) and worker_pids(runner) == before


def test_a_call_blocked_in_c_on_a_threads_cluster_leaves_its_worker_thread(tmp_path, silent_port, caplog):
    # The stuck thread cannot be stopped; it leaves its worker's thread pool, so
    # both workers' threads (one each) still run calls: two calls can meet.
    caplog.set_level(logging.WARNING, logger=LOGGER)
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    with SyncDask(cluster_kwargs={**THREADS_CLUSTER}, batch_size=1).start() as runner:
        _, after_limit, pid = timed_out_reading(runner, tmp_path, silent_port)
        assert after_limit < SLACK, after_limit
        assert pid == os.getpid()
        warnings = [record.getMessage() for record in caplog.records if record.name == LOGGER]
        assert any("stuck-reading" in message and "may still be running" in message for message in warnings)
        futures = [runner.submit(TaskRun(), meet, {"directory": str(meeting), "name": name}) for name in "ab"]
        assert [runner.wait(future, timeout=60).result() for future in futures] == [True, True]


@pytest.mark.parametrize("where", ["processes", "external"])
def test_the_calls_batched_with_a_call_blocked_in_c_run_once_each(where, request, tmp_path, silent_port):
    if where == "processes":
        runner = SyncDask(cluster_kwargs=dict(PROCESSES_CLUSTER), batch_size=6)
    else:
        runner = SyncDask(address=request.getfixturevalue("dask_external_cluster").address, batch_size=6)
    calls = 20
    counters = [str(tmp_path / f"counter-{n}") for n in range(calls)]
    with runner.start():
        # The first four fill the Dask tasks the dispatcher keeps out (twice the two
        # worker threads), so that the others are gathered into batches of six.
        futures = [
            runner.submit(
                TaskRun(name=f"call-{n}"),
                read_if,
                {"value": n, "counter": counters[n], "port": silent_port, "nap": 1.0 if n < 4 else 0.05,
                 "stuck_here": n == 7},
                timeout_seconds=2 * LIMIT,  # one limit for all: one run_fn, one batch
            )
            for n in range(calls)
        ]
        states = [runner.wait(future, timeout=120) for future in futures]
        stuck_call = call_of(futures[7])
    # It went in a batch, with calls before and after it.
    assert stuck_call.position is not None and stuck_call.position > 0
    for n, state in enumerate(states):
        if n == 7:
            assert state.name == "TimedOut", state
        else:
            assert state.result() == n
            assert stuck.count(counters[n]) == 1, f"call {n} ran {stuck.count(counters[n])} times"
