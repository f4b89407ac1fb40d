"""ParallelTaskRunner specifics: worker processes, crashes, pickling, logs, interrupts."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import threading
import weakref

import cloudpickle
import loky
import psutil
import pytest
from loky.process_executor import TerminatedWorkerError

from taskrunners import TaskRun
from taskrunners._core.parallel import loky_private
from taskrunners._core.seam import core_of
from taskrunners.states import Completed
from taskrunners.sync import ParallelTaskRunner
from taskrunners._core.seam import call_of
from tests.support import parallel_payloads, payloads
from tests.support.kinds import all_kinds, parametrize_kinds
from tests.support.processes import assert_all_ended, run_python
from tests.support.waiting import wait_for_path, wait_until

pytestmark = pytest.mark.timeout(120)

SCRIPT = os.path.join(os.path.dirname(__file__), "support", "parallel_script.py")

# The standard suite's driver fixture, on the parallel kind only: twin, asyncio, trio.
PARALLEL_KIND = parametrize_kinds(kind for kind in all_kinds() if kind.id == "parallel")


def run(runner, run_fn, run_kwargs=None, name=None):
    return runner.wait(runner.submit(TaskRun(name=name), run_fn, run_kwargs or {}))


# -- construction ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_max_workers_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="`max_workers` must be a positive integer or None"):
        ParallelTaskRunner(max_workers=value)


def test_constructor_checks_initializer_initargs_and_env():
    with pytest.raises(TypeError, match="`initializer` must be callable"):
        ParallelTaskRunner(initializer=3)
    with pytest.raises(TypeError, match="`initargs` must be a tuple"):
        ParallelTaskRunner(initializer=print, initargs=[1])
    with pytest.raises(ValueError, match="`env` must be a mapping"):
        ParallelTaskRunner(env={"NAME": 1})


def test_settings_are_kept_and_max_workers_defaults_to_usable_cpus():
    runner = ParallelTaskRunner(env={"A": "1"})
    assert runner.max_workers is None and runner.env == {"A": "1"}
    with runner.start():  # no call submitted: no worker is started
        assert len(runner._pool._workers) == loky.cpu_count()


# -- what the runner reads of loky beyond its public API -------------------------------------


@pytest.mark.parametrize("function", loky_private.required())
def test_the_installed_loky_has_the_private_name_each_engine_function_reads(function):
    assert loky_private.available(function), (
        f"taskrunners._core.parallel.loky_private.{function}() falls back: loky {loky.__version__} no "
        "longer has the private name it reads. Adapt the function, and the loky range in "
        "setup.cfg."
    )


def test_the_engine_functions_fall_back_when_loky_lacks_their_private_name(monkeypatch, tmp_path):
    from loky import process_executor
    from loky.backend import resource_tracker

    for name in ("EXTRA_QUEUED_CALLS", "TerminatedWorkerError", "ShutdownExecutorError"):
        monkeypatch.delattr(process_executor, name)
    monkeypatch.delattr(resource_tracker, "register")
    monkeypatch.delattr(resource_tracker, "unregister")
    # (stopped_workers, no_wakeup and manager_thread are left out: their checks make
    # an executor, which needs the tracker.)
    makes_an_executor = ("stopped_workers", "no_wakeup", "manager_thread")
    names = [n for n in loky_private.required() if n not in makes_an_executor]
    assert [name for name in names if not loky_private.available(name)] == names
    assert loky_private.call_queue_size(2) == 5
    error = loky_private.worker_died_error("a worker died")
    assert type(error) is loky.BrokenProcessPool and str(error) == "a worker died"
    assert not loky_private.is_shutdown_error(RuntimeError("cannot schedule new futures"))
    assert loky_private.stopped_workers(object()) == {}
    with loky_private.no_wakeup(object()):  # an executor without the wake-up: nothing done
        pass
    assert loky_private.manager_thread(object()) is None
    loky_private.track_folder(str(tmp_path))  # nothing to do, and no error
    loky_private.untrack_folder(str(tmp_path))


def test_no_wakeup_silences_the_managers_wakeup_only_within_and_raises_through():
    executor = loky.ProcessPoolExecutor(max_workers=1)
    try:
        wakeup = executor._executor_manager_thread_wakeup
        with pytest.raises(ZeroDivisionError):
            with loky_private.no_wakeup(executor):
                assert executor._executor_manager_thread_wakeup is not wakeup
                raise ZeroDivisionError
        assert executor._executor_manager_thread_wakeup is wakeup
    finally:
        executor.shutdown(wait=True)


# -- where and how calls run -------------------------------------------------------------


def test_calls_run_in_worker_processes_that_stop_with_the_block():
    with ParallelTaskRunner(max_workers=2).start() as runner:
        states = [run(runner, payloads.sleep_then_return, {"seconds": 0.2}) for _ in range(4)]
        pids = {run(runner, payloads.return_pid).result() for _ in range(8)}
        assert all(state.is_completed() for state in states)
    # Which of the two workers took the calls is loky's choice: one or both.
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # No worker outlives the block: start() has joined them.
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


def test_lambdas_and_closures_travel_by_value():
    offset = 40

    def add_offset(x):
        return Completed(data=x + offset)

    with ParallelTaskRunner(max_workers=2).start() as runner:
        assert run(runner, lambda: Completed(data="lambda")).result() == "lambda"
        assert run(runner, add_offset, {"x": 2}).result() == 42


@pytest.mark.timeout(60)
def test_functions_defined_in_main_work_without_a_main_guard():
    result = run_python(SCRIPT, "main", timeout=50)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "square": 49,
        "other_pid": True,
        "add": 15,
    }


@PARALLEL_KIND
def test_a_coroutine_run_fn_runs_on_an_event_loop_in_a_worker(driver):
    with driver.start():
        pid, loop_running = driver.run(parallel_payloads.where_coroutines_run).result()
    assert pid != os.getpid()
    assert loop_running


def test_a_chain_of_dependent_calls_completes_on_one_worker():
    with ParallelTaskRunner(max_workers=1).start() as runner:
        future = runner.submit(TaskRun(), payloads.return_value, {"value": 0})
        for _ in range(20):
            future = runner.submit(TaskRun(), payloads.add_upstream, {"upstream": future, "y": 1})
        assert runner.wait(future).result() == 20


@pytest.mark.timeout(180)
def test_a_fan_out_released_at_once_does_not_deadlock(tmp_path):
    """17,000 calls wait on one upstream call and all become ready in one callback.

    Submitted from loky's manager thread itself, they would fill its wake-up pipe
    (16,384 wake-ups) and block it for good.
    """
    gate = str(tmp_path / "gate")
    with ParallelTaskRunner(max_workers=2).start() as runner:
        upstream = runner.submit(TaskRun(), parallel_payloads.value_once_file_exists, {"path": gate, "value": 1})
        dependents = [
            runner.submit(TaskRun(), payloads.add_upstream, {"upstream": upstream, "y": i})
            for i in range(17_000)
        ]
        pathlib.Path(gate).touch()
        values = [runner.wait(future).result() for future in dependents]
    assert values == [1 + i for i in range(17_000)]


def test_initializer_initargs_and_env_reach_the_workers():
    runner = ParallelTaskRunner(
        max_workers=2,
        initializer=parallel_payloads.set_environment,
        initargs=("TR_FROM_INITIALIZER", "initialized"),
        env={"TR_FROM_ENV": "from env"},
    )
    with runner.start():
        _, seen = run(
            runner,
            lambda: parallel_payloads.pid_and_environment("TR_FROM_INITIALIZER", "TR_FROM_ENV"),
        ).result()
    assert seen == {"TR_FROM_INITIALIZER": "initialized", "TR_FROM_ENV": "from env"}
    assert "TR_FROM_ENV" not in os.environ


def test_a_failing_initializer_crashes_the_calls_with_its_error():
    runner = ParallelTaskRunner(max_workers=2, initializer=parallel_payloads.failing_initializer)
    with runner.start():
        state = run(runner, payloads.return_value, {"value": 1}, name="never-runs")
        # The runner keeps accepting work, and says the same thing.
        again = run(runner, payloads.return_value, {"value": 2})
    for crashed in (state, again):
        assert crashed.is_crashed()
        assert "initializer" in crashed.message
        assert "ValueError: initializer refused to start" in crashed.message
    assert "'never-runs'" in state.message


def test_workers_that_keep_dying_before_a_call_starts_crash_it_after_three_pools():
    runner = ParallelTaskRunner(max_workers=2, initializer=parallel_payloads.exit_at_start)
    with runner.start():
        state = run(runner, payloads.return_value, {"value": 1}, name="unlucky")
    assert state.is_crashed()
    assert "'unlucky' never started: the process pool broke 3 times" in state.message
    assert "exited with code 5" in state.message


# -- a worker that dies --------------------------------------------------------------------


@pytest.mark.parametrize(
    "how, death",
    [
        ("exit", "exited with code 3"),
        ("sigkill", "was killed by SIGKILL (exit code -9)"),
        ("segfault", "was killed by SIGSEGV (exit code -11)"),
    ],
    ids=["exit-exited with code 3", "sigkill-SIGKILL", "segfault-SIGSEGV"],
)
def test_a_worker_dying_mid_call(tmp_path, how, death):
    log, marker = str(tmp_path / "starts"), str(tmp_path / "sleeper-running")
    with ParallelTaskRunner(max_workers=2).start() as runner:
        sleeper = runner.submit(
            TaskRun(name="sleeper"),
            parallel_payloads.record_and_sleep,
            {"log": log, "tag": "sleeper", "marker": marker, "seconds": 2},
        )
        dying = runner.submit(
            TaskRun(name="dying"),
            parallel_payloads.die_once_marker_exists,
            {"log": log, "tag": "dying", "marker": marker, "how": how},
        )
        # Both workers are busy: these have not started when the worker dies.
        queued = [
            runner.submit(
                TaskRun(), parallel_payloads.record_and_return, {"log": log, "tag": f"q{i}", "value": i}
            )
            for i in range(6)
        ]
        dying_state = runner.wait(dying)
        sleeper_state = runner.wait(sleeper)
        queued_values = [runner.wait(future).result() for future in queued]
        after = run(runner, payloads.return_value, {"value": "after"})
        sleeper_pid = int(pathlib.Path(marker).read_text())

    assert dying_state.is_crashed()
    died = re.fullmatch(  # the dying worker's pid: the one part the test cannot know
        rf"The worker process \(pid (\d+)\) running task run 'dying' died unexpectedly: it "
        rf"{re.escape(death)}\. A segfault, the out-of-memory killer or os\._exit\(\) in the call "
        r"can cause this\.",
        dying_state.message,
    )
    assert died, dying_state.message
    dying_pid = died[1]
    error = dying_state.result(raise_on_failure=False)
    assert type(error) is TerminatedWorkerError and str(error) == dying_state.message

    # The other worker's call goes on, and is delivered.
    assert sleeper_state.is_completed() and sleeper_state.result() == "sleeper"
    assert str(sleeper_pid) != dying_pid

    assert queued_values == list(range(6))
    assert after.result() == "after"
    # Every call started exactly once: none was lost, none ran twice.
    assert parallel_payloads.started_calls(log) == sorted(
        ["sleeper", "dying"] + [f"q{i}" for i in range(6)]
    )


def test_a_worker_dying_is_logged_and_replaced_alone(tmp_path, caplog):
    marker = str(tmp_path / "marker")
    pathlib.Path(marker).touch()
    with ParallelTaskRunner(max_workers=2).start() as runner:
        before = run(runner, payloads.return_pid).result()
        with caplog.at_level(logging.WARNING, logger="task_runner.parallel"):
            state = run(
                runner,
                parallel_payloads.die_once_marker_exists,
                {"log": os.devnull, "tag": "x", "marker": marker, "how": "exit"},
            )
            after = run(runner, payloads.return_pid).result()
    assert state.is_crashed() and "exited with code 3" in state.message
    assert before != after
    (warning,) = [record for record in caplog.records if record.name == "task_runner.parallel"]
    assert warning.levelno == logging.WARNING
    assert re.fullmatch(
        r"A worker process of the pool died \(worker process \(pid \d+\) exited with code 3\); "
        r"it is replaced\.",
        warning.getMessage(),
    ), warning.getMessage()


# -- values that cannot be pickled ----------------------------------------------------------


@PARALLEL_KIND
def test_an_argument_that_cannot_be_pickled_crashes_the_call_at_once(driver):
    with driver.start():
        future = driver.submit(payloads.return_value, {"value": threading.Lock()}, TaskRun(name="locked"))
        state = driver.wait(future, timeout=0)
        assert state is not None and state.is_crashed()
        assert state.message == (
            "Task run 'locked' was not started: the arguments (run_kwargs) could not be pickled "
            "to send to a worker process: TypeError: cannot pickle '_thread.lock' object. Pass "
            "only values that cloudpickle can serialize, or create the value inside run_fn."
        )
        error = state.result(raise_on_failure=False)
        assert type(error) is TypeError and str(error) == "cannot pickle '_thread.lock' object"
        # The pool is fine.
        assert driver.run(payloads.return_value, {"value": 3}).result() == 3


def test_a_run_fn_that_cannot_be_pickled_is_named():
    lock = threading.Lock()

    def holds_a_lock():
        with lock:
            return Completed(data=1)

    with ParallelTaskRunner(max_workers=2).start() as runner:
        state = runner.wait(runner.submit(TaskRun(name="holding"), holds_a_lock, {}), timeout=0)
    assert state.is_crashed()
    assert state.message == (
        "Task run 'holding' was not started: run_fn could not be pickled to send to a worker "
        "process: TypeError: cannot pickle '_thread.lock' object. Pass only values that "
        "cloudpickle can serialize, or create the value inside run_fn."
    )


def test_a_call_the_workers_cannot_unpickle_crashes_naming_the_module(tmp_path, monkeypatch):
    with ParallelTaskRunner(max_workers=1).start() as runner:
        run(runner, payloads.return_value)  # the worker starts with this sys.path
        (tmp_path / "only_in_parent.py").write_text(
            "from taskrunners.states import Completed\n\ndef hello():\n    return Completed(data=1)\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        import only_in_parent  # pickled by reference: importable here, not in the worker

        try:
            state = run(runner, only_in_parent.hello, name="elsewhere")
        finally:
            del sys.modules["only_in_parent"]
        after = run(runner, payloads.return_value, {"value": "fine"})
    assert state.is_crashed()
    assert "'elsewhere' could not be unpickled in the worker process" in state.message
    assert "only_in_parent" in state.message
    assert after.result() == "fine"


def test_a_result_this_process_cannot_unpickle_crashes_naming_the_module(tmp_path):
    (tmp_path / "only_in_workers.py").write_text("class Thing:\n    pass\n")
    directory = str(tmp_path)

    def make_thing():
        sys.path.insert(0, directory)  # in the worker only
        import only_in_workers

        return Completed(data=only_in_workers.Thing())

    with ParallelTaskRunner(max_workers=1).start() as runner:
        state = run(runner, make_thing, name="foreign")
        after = run(runner, payloads.return_value, {"value": "fine"})
    assert state.is_crashed()
    assert "'foreign' could not be unpickled in this process" in state.message
    assert "only_in_workers" in state.message
    assert after.result() == "fine"


@PARALLEL_KIND
def test_a_result_that_cannot_be_pickled_crashes_the_call(driver):
    with driver.start():
        state = driver.wait(
            driver.submit(payloads.return_unpicklable, task_run=TaskRun(name="unpicklable"))
        )
        later = driver.run(payloads.return_value, {"value": "fine"})
        pool = core_of(driver.runner)._pool
        generations = pool._made - len(pool._workers) + 1
    assert state.is_crashed()
    assert "could not be pickled to send it back" in state.message and "_thread.lock" in state.message
    assert "'unpicklable'" in state.message
    # The pickling error itself (rebuilt: the original may hold the lock).
    error = state.result(raise_on_failure=False)
    assert type(error) is TypeError and str(error) == "cannot pickle '_thread.lock' object"
    assert later.result() == "fine"
    assert generations == 1  # no worker was ever replaced


def test_a_result_pickling_error_that_cannot_be_rebuilt_comes_back_as_a_pickling_error():
    with ParallelTaskRunner(max_workers=1).start() as runner:
        state = run(runner, parallel_payloads.return_refusing_value, name="refusing")
    assert state.is_crashed() and "'refusing'" in state.message
    assert "could not be pickled to send it back" in state.message
    assert "RefusedError: this value refuses to be pickled" in state.message
    error = state.result(raise_on_failure=False)
    assert type(error) is pickle.PicklingError and str(error) == "this value refuses to be pickled"


# -- call handles, as concurrent.futures futures -------------------------------------------


@contextlib.contextmanager
def process_pool_executor():
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        yield lambda fn, **kwargs: executor.submit(fn, **kwargs)


@contextlib.contextmanager
def parallel_task_runner():
    with ParallelTaskRunner(max_workers=1).start() as runner:
        yield lambda fn, **kwargs: call_of(runner.submit(TaskRun(), fn, kwargs))


@pytest.mark.parametrize("pool", [process_pool_executor, parallel_task_runner])
def test_running_and_cancel_behave_as_in_a_process_pool(tmp_path, pool):
    """The same scenario on ProcessPoolExecutor (the reference) and on the runner's handles."""
    log = str(tmp_path / "starts")
    first_marker, first_gate = str(tmp_path / "first"), str(tmp_path / "first-gate")
    last_marker, last_gate = str(tmp_path / "last"), str(tmp_path / "last-gate")
    with pool() as submit:
        first = submit(
            payloads.run_once_gate_opens, marker=first_marker, gate=first_gate, value="first"
        )
        middle = [
            submit(parallel_payloads.record_and_return, log=log, tag=f"m{i}", value=i)
            for i in range(8)
        ]
        last = submit(
            payloads.run_once_gate_opens, marker=last_marker, gate=last_gate, value="last"
        )
        wait_for_path(first_marker)
        assert first.running() and not first.cancel() and not first.cancelled()
        # The pool moves the next call to its workers' queue before a worker is free:
        # from then on it is running, and cannot be cancelled, though it has not started.
        wait_until(middle[0].running, what="the next call was not handed to the worker")
        assert not middle[0].cancel() and not middle[0].cancelled()
        # Calls still waiting behind it can be cancelled, and then never run.
        assert not last.running()
        assert [call.cancel() for call in middle[4:]] == [True] * 4
        assert all(call.cancelled() and call.done() and not call.running() for call in middle[4:])
        assert [call.cancel() for call in middle[4:]] == [True] * 4  # as often as asked

        pathlib.Path(first_gate).touch()
        assert first.result(timeout=60).result() == "first"
        assert not first.running() and not first.cancel()
        wait_for_path(last_marker)
        assert last.running() and not last.cancel()
        pathlib.Path(last_gate).touch()
        assert last.result(timeout=60).result() == "last"
        assert not last.running() and not last.cancelled()
        assert [call.result(timeout=60).result() for call in middle[:4]] == [0, 1, 2, 3]
    # Calls run in order on the one worker: the cancelled ones would have run by now.
    assert parallel_payloads.started_calls(log) == ["m0", "m1", "m2", "m3"]
    if pool is parallel_task_runner:  # a cancelled call's State
        state = middle[-1].result(0)
        assert state.is_crashed() and state.message == "Execution was cancelled by the runtime environment."
        assert type(state.result(raise_on_failure=False)) is concurrent.futures.CancelledError


def test_loky_never_holds_more_batches_than_its_call_queue():
    """Whichever thread hands a batch over: the feeder, or loky's manager thread in place
    of a batch it settled; also while callers wait for gathered calls, which sends them
    at once. More would leave calls that cannot be cancelled though they have not
    started."""
    with ParallelTaskRunner(max_workers=1).start() as runner:
        executor = runner._pool._workers[0].executor
        lock = threading.Lock()
        held, most = [0], [0]
        submit = executor.submit

        def counting_submit(*args, **kwargs):  # a pass-through spy
            future = submit(*args, **kwargs)
            with lock:
                held[0] += 1
                most[0] = max(most[0], held[0])

            def left(_):
                with lock:
                    held[0] -= 1

            future.add_done_callback(left)
            return future

        executor.submit = counting_submit
        futures = [runner.submit(TaskRun(), payloads.return_value, {"value": i}) for i in range(300)]
        assert [runner.wait(future).result() for future in futures] == list(range(300))
    assert 1 <= most[0] <= 2  # PLACES_PER_WORKER, within loky's call queue (3)


def test_an_executor_shutdown_cancelling_calls_marks_them_cancelled(tmp_path):
    from taskrunners.compat.futures import RunnerExecutor

    log, marker, gate = str(tmp_path / "starts"), str(tmp_path / "first"), str(tmp_path / "gate")
    runner = ParallelTaskRunner(max_workers=1)
    executor = RunnerExecutor(runner)
    first = executor.submit(payloads.run_once_gate_opens, marker, gate, "first")
    queued = [
        executor.submit(parallel_payloads.record_and_return, log, f"q{i}", i) for i in range(20)
    ]
    wait_for_path(marker)
    executor.shutdown(wait=False, cancel_futures=True)
    pathlib.Path(gate).touch()
    assert first.result(timeout=60).result() == "first"
    wait_until(
        lambda: all(future.done() for future in queued) and not runner.is_started,
        what="the executor did not settle its calls and stop the runner",
    )
    # Only the calls already handed to the worker were not cancelled; they ran.
    ran = [i for i, future in enumerate(queued) if not future.cancelled()]
    assert len(ran) < 10
    assert [queued[i].result().result() for i in ran] == ran
    assert parallel_payloads.started_calls(log) == sorted(f"q{i}" for i in ran)


def test_a_finished_call_is_not_kept_alive_by_the_runner():
    class Result:
        pass

    class Argument:
        pass

    class Function:
        def __call__(self, argument):
            return Completed(data=Result())

    function, argument = Function(), Argument()
    with ParallelTaskRunner(max_workers=2).start() as runner:
        future = runner.submit(TaskRun(), function, {"argument": argument})
        state = runner.wait(future)
        assert isinstance(state.result(), Result)
        refs = [weakref.ref(obj) for obj in (state.result(), function, argument)]
        del state, future, function, argument

        def all_gone():
            gc.collect()
            return [ref() for ref in refs] == [None, None, None]

        # The runner is started and idle: nothing of it may hold the call any more.
        wait_until(all_gone, 10, "the runner still holds the call's function, argument or result")


# -- logging -------------------------------------------------------------------------------


def test_worker_log_records_reach_the_parent(caplog):
    caplog.set_level(logging.INFO)  # before start: the workers' threshold is taken there
    with ParallelTaskRunner(max_workers=2).start() as runner:
        worker_pid = run(runner, parallel_payloads.log_some_records, {"logger_name": "tests.worker"}).result()
    records = [record for record in caplog.records if record.name == "tests.worker"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "hello there"),
        ("WARNING", "careful: 3"),
        ("ERROR", "it failed"),
    ]
    assert all(record.process == worker_pid for record in records)
    assert "ValueError: logged failure" in records[-1].exc_text
    assert "it failed" in caplog.text and "ValueError: logged failure" in caplog.text


def test_worker_records_respect_the_parent_logger_levels(caplog):
    caplog.set_level(logging.INFO)
    logging.getLogger("tests.quiet").setLevel(logging.ERROR)
    try:
        with ParallelTaskRunner(max_workers=1).start() as runner:
            run(runner, parallel_payloads.log_some_records, {"logger_name": "tests.quiet"})
    finally:
        logging.getLogger("tests.quiet").setLevel(logging.NOTSET)
    assert [r.getMessage() for r in caplog.records if r.name == "tests.quiet"] == ["it failed"]


# -- pickling the runner ----------------------------------------------------------------------


@PARALLEL_KIND
def test_an_unpickled_started_runner_refuses_submit_and_wait(driver):
    with driver.start():
        future = driver.submit(payloads.return_value, {"value": 1})
        copy = cloudpickle.loads(cloudpickle.dumps(driver.runner))
        copied = driver.for_runner(copy)
        with pytest.raises(RuntimeError, match="after serialization"):
            copied.submit(payloads.return_value, {"value": 2})
        with pytest.raises(RuntimeError, match="after serialization"):
            copied.wait(future)
        assert driver.wait(future).result() == 1


# -- leaving the block early ---------------------------------------------------------------------


@pytest.mark.parametrize("error", [KeyError("stop"), KeyboardInterrupt()])
def test_leaving_with_an_exception_cancels_queued_calls_and_kills_the_workers(tmp_path, error):
    log = str(tmp_path / "starts")
    markers = [str(tmp_path / "first"), str(tmp_path / "second")]
    runner = ParallelTaskRunner(max_workers=2)
    with pytest.raises(type(error)) as info, runner.start():
        running = [
            runner.submit(
                TaskRun(name=f"sleeper-{i}"),
                parallel_payloads.record_and_sleep,
                {"log": log, "tag": f"sleeper-{i}", "marker": marker, "seconds": 120},
            )
            for i, marker in enumerate(markers)
        ]
        queued = [
            runner.submit(TaskRun(), parallel_payloads.record_and_return, {"log": log, "tag": f"q{i}"})
            for i in range(4)
        ]
        for marker in markers:
            wait_for_path(marker)
        raise error
    assert info.value is error
    worker_pids = [int(pathlib.Path(marker).read_text()) for marker in markers]
    assert_all_ended(worker_pids)

    for future, pid in zip(running, worker_pids):
        state = runner.wait(future, timeout=0)
        assert state.is_crashed() and not call_of(future).cancelled()
        assert state.message == (
            f"Task run {future.task_run.name!r} was stopped in worker process (pid {pid}): the "
            f"runner's start() block was left with {error!r}, which terminates the worker processes."
        )
    for future in queued:
        state = runner.wait(future, timeout=0)
        assert state.is_crashed() and state.message == "Execution was cancelled by the runtime environment."
        assert call_of(future).cancelled()  # never started, whichever queue it was in
    assert parallel_payloads.started_calls(log) == ["sleeper-0", "sleeper-1"]
    # The runner can start again.
    with runner.start():
        assert run(runner, payloads.return_value, {"value": "again"}).result() == "again"


@pytest.mark.timeout(120)
def test_leaving_with_an_exception_prints_nothing(tmp_path):
    """Calls queued in loky when the block is left are cancelled without a word.

    Cancelling loky's futures made its manager thread print an InvalidStateError
    traceback when the workers were then killed; a race, so ten rounds.
    """
    result = run_python(SCRIPT, "abort", "10", tmp_path, timeout=110)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "rounds": 10,
        "queued_calls_cancelled": True,
    }


@pytest.mark.timeout(90)
def test_ctrl_c_on_a_waiting_script_exits_promptly_and_leaves_no_child(tmp_path):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "interrupt", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children = []
    try:
        line = process.stdout.readline()
        assert line.strip() == "waiting", process.stderr.read() if process.poll() is not None else line
        children = psutil.Process(process.pid).children(recursive=True)
        worker_pids = {int((tmp_path / name).read_text()) for name in ("first", "second")}
        assert worker_pids <= {child.pid for child in children}

        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the script did not exit within 10 s of SIGINT")
        assert process.returncode != 0
        assert "KeyboardInterrupt" in process.stderr.read()
        assert "not interrupted" not in process.stdout.read()
        assert_all_ended(children)
    finally:
        for leftover in [process, *children]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                leftover.kill()
        process.wait(timeout=10)


@pytest.mark.timeout(90)
def test_workers_do_not_outlive_a_parent_killed_outright(tmp_path):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "interrupt", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers = []
    try:
        line = process.stdout.readline()
        assert line.strip() == "waiting", process.stderr.read() if process.poll() is not None else line
        worker_pids = [int((tmp_path / name).read_text()) for name in ("first", "second")]
        workers = [psutil.Process(pid) for pid in worker_pids]
        process.kill()  # SIGKILL: the runner gets no chance to stop its workers
        process.wait(timeout=10)
        assert_all_ended(workers)
    finally:
        for leftover in [process, *workers]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                leftover.kill()
        process.wait(timeout=10)
