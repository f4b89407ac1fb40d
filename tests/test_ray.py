"""RayTaskRunner specifics: starting versus joining Ray, per-call options, dead workers.

The standard suite covers the contract on the shared Ray instance of the session
(tests/support/kinds_ray.py). Tests here are grouped by the Ray connection they need, in
this order, so Ray starts as few times as possible: none, a runner's own local
instance (the shared one released), the shared one, and a head started with
``ray start --head`` for the session.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import re
from pathlib import Path

import anyio
import cloudpickle
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskRun
from taskrunners._core.ray import ray_private
from taskrunners._core.ray.options import call_options, ray_options
from taskrunners._core.ray.runner import DEFAULT_REMOTE_OPTIONS
from taskrunners.states import Completed
from taskrunners._core.seam import call_of
from tests.support import payloads, ray_payloads
from tests.support.driver import driving
from tests.support.kinds import parametrize_kinds
from tests.support.kinds_ray import HEAD_ENV, KINDS, LOCAL_INIT_KWARGS, ray_processes
from tests.support.pickling import register_payloads
from tests.support.processes import assert_all_ended, run_python

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

RAY_KIND = parametrize_kinds(KINDS)
MISSING_RAY = "Using the `RayTaskRunner` requires `ray` to be installed."
CANCELLED = "Execution was cancelled by the runtime environment."


@pytest.fixture(autouse=True)
def _payloads_by_value():
    """Ray workers get the test run_fns by value, whichever test starts Ray first."""
    ray = pytest.importorskip("ray")
    register_payloads(ray.cloudpickle)


def lines(path):
    return Path(path).read_text().splitlines() if Path(path).exists() else []


def run_script(*args, env=None, timeout=170):
    """Run this interpreter with ``args``; its output, once it exited with 0."""
    return run_python(*args, env=env, timeout=timeout, check=True).stdout


def join_script(*args, env=None, timeout=170):
    """Run tests/support/ray_join.py; its JSON report."""
    output = run_script("-m", "tests.support.ray_join", *args, env=env, timeout=timeout)
    return json.loads(output.strip().splitlines()[-1])


def clean_env(**changes):
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.pop(HEAD_ENV, None)
    env.update(changes)
    return env


# -- no Ray connection needed ---------------------------------------------------------------


def test_importing_taskrunners_does_not_import_ray():
    output = run_script(
        "-c",
        "import sys, taskrunners, taskrunners.sync, taskrunners.task_runners;"
        "taskrunners.RayTaskRunner(); taskrunners.sync.RayTaskRunner(address='127.0.0.1:6379');"
        "print('ray' in sys.modules)",
    )
    assert output.strip() == "False"


WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # what `import ray` meets when ray is not installed
import anyio, taskrunners, taskrunners.sync

def errors():
    runner = taskrunners.sync.RayTaskRunner(init_kwargs={"num_cpus": 1})
    try:
        with runner.start():
            pass
    except RuntimeError as exc:
        yield str(exc), runner.is_started
    for backend in ("asyncio", "trio"):
        runner = taskrunners.RayTaskRunner()

        async def start():
            async with runner.start():
                pass

        try:
            anyio.run(start, backend=backend)
        except RuntimeError as exc:
            yield str(exc), runner.is_started

print(list(errors()))
"""


def test_without_ray_starting_gives_the_seed_error():
    # In a subprocess: hiding ray here would break the Ray threads of this process.
    output = run_script("-c", WITHOUT_RAY)
    assert output.strip() == repr([(MISSING_RAY, False)] * 3)


def test_settings_namespace_default_and_validation():
    given = {"num_cpus": 2}
    runner = taskrunners.RayTaskRunner(address="127.0.0.1:6379", init_kwargs=given)
    assert runner.address == "127.0.0.1:6379"
    assert runner.init_kwargs == {"num_cpus": 2, "namespace": "prefect"}
    assert given == {"num_cpus": 2}, "init_kwargs must be copied, not changed"
    assert taskrunners.sync.RayTaskRunner(init_kwargs={"namespace": "mine"}).init_kwargs == {
        "namespace": "mine"
    }
    assert runner.remote_options == {"max_retries": 0} == dict(DEFAULT_REMOTE_OPTIONS)
    assert taskrunners.sync.RayTaskRunner(
        remote_options={"max_retries": 2, "num_cpus": 0.5}
    ).remote_options == {"max_retries": 2, "num_cpus": 0.5}
    assert runner.concurrency_type is taskrunners.TaskConcurrencyType.PARALLEL

    with pytest.raises(TypeError, match="`address` must be a string"):
        taskrunners.sync.RayTaskRunner(address=6379)
    with pytest.raises(ValueError, match=r"address='ray://h:1'.*not in `init_kwargs`"):
        taskrunners.sync.RayTaskRunner(init_kwargs={"address": "ray://h:1"})
    with pytest.raises(TypeError, match="`remote_options` must be a dict"):
        taskrunners.sync.RayTaskRunner(remote_options=[("num_cpus", 1)])
    with pytest.raises(TypeError, match="`init_kwargs` must be a dict"):
        taskrunners.sync.RayTaskRunner(init_kwargs="num_cpus=2")


@pytest.mark.parametrize(
    "runner_class", [taskrunners.sync.RayTaskRunner, taskrunners.RayTaskRunner], ids=["twin", "facade"]
)
def test_a_key_ray_init_does_not_take_is_refused_at_construction(runner_class):
    with pytest.raises(TypeError) as caught:
        runner_class(init_kwargs={"num_cpu": 2})
    assert str(caught.value) == (
        "`init_kwargs` has a key not taken by ray.init(): 'num_cpu' (did you mean 'num_cpus'?). "
        "Correct or remove it."
    )
    with pytest.raises(TypeError) as caught:
        runner_class(init_kwargs={"namespace": "x", "flux": 1, "include_dashbaord": False})
    assert str(caught.value).startswith(
        "`init_kwargs` has keys not taken by ray.init(): 'flux' (nothing close to it), "
        "'include_dashbaord' (did you mean 'include_dashboard'?). Correct or remove them; the keys "
        "taken are "
    )
    assert re.search(r"taken are .*\bnamespace, num_cpus, num_gpus\b.*\.$", str(caught.value))
    # Its parameters, and the hidden options it takes through **kwargs, pass.
    runner_class(init_kwargs=dict(LOCAL_INIT_KWARGS))
    runner_class(
        init_kwargs={
            "num_cpus": 1, "resources": {"a": 1}, "runtime_env": {}, "log_to_driver": False,
            "_temp_dir": "/tmp/ray-x", "_system_config": {}, "object_spilling_directory": "/tmp",
            "_some_future_hidden_option": 1,
        }
    )


KEYS_CHECKED_AT_CONSTRUCTION = """
import sys, taskrunners.sync
taskrunners.sync.RayTaskRunner()
print("nothing to check", "ray" in sys.modules)
try:
    taskrunners.sync.RayTaskRunner(init_kwargs={"num_cpu": 1})
except TypeError as exc:
    print(exc)
"""


def test_init_kwargs_are_checked_at_construction_importing_ray_only_then():
    output = run_script("-c", KEYS_CHECKED_AT_CONSTRUCTION, env=clean_env())
    assert output.strip().splitlines() == [
        "nothing to check False",
        "`init_kwargs` has a key not taken by ray.init(): 'num_cpu' (did you mean 'num_cpus'?). "
        "Correct or remove it.",
    ]


def test_ray_options_validate_and_nest():
    assert dict(call_options()) == {}
    with ray_options(num_cpus=2, resources={"a": 1}) as outer:
        assert dict(outer) == {"num_cpus": 2, "resources": {"a": 1}}
        with ray_options(memory=1024, num_gpus=0.5, resources={"b": 2}) as inner:
            assert dict(inner) == {
                "num_cpus": 2,
                "num_gpus": 0.5,
                "memory": 1024,
                "resources": {"a": 1, "b": 2},
            }
        with ray_options(num_cpus=1):
            assert call_options()["num_cpus"] == 1
        assert dict(call_options()) == dict(outer)
    assert dict(call_options()) == {}

    with pytest.raises(ValueError, match=r"`num_cpus` must be a non-negative number, got -1"):
        ray_options(num_cpus=-1).__enter__()
    with pytest.raises(ValueError, match=r"`num_gpus` must be a non-negative number, got 'x'"):
        ray_options(num_gpus="x").__enter__()
    with pytest.raises(ValueError, match=r"`memory` must be a non-negative integer, got 1.5"):
        ray_options(memory=1.5).__enter__()
    with pytest.raises(ValueError, match=r"Give 'CPU' as `num_cpus=`"):
        ray_options(resources={"CPU": 2}).__enter__()
    with pytest.raises(TypeError, match="`resources` must be a mapping"):
        ray_options(resources=[("a", 1)]).__enter__()
    with pytest.raises(ValueError, match=r"`resources\['a'\]` must be a non-negative number"):
        ray_options(resources={"a": -2}).__enter__()
    assert dict(call_options()) == {}


@pytest.mark.parametrize("function", sorted(ray_private.PRIVATE_NAMES))
def test_the_installed_ray_has_each_private_name_the_runner_uses(function):
    import ray

    private = ray_private.PRIVATE_NAMES[function]
    assert ray_private.required()[function], (
        f"taskrunners._core.ray.ray_private.{function}() relies on {private.name}, which Ray "
        f"{ray.__version__} no longer has: it now runs its fallback. Update it, or pin Ray "
        "below this version in setup.cfg."
    )


# -- runners that start their own local instance (the shared one released) -----------------


@pytest.mark.parametrize("mode", ["sync", "trio"])
def test_a_runner_with_no_address_starts_a_local_instance_and_shuts_it_down(
    ray_session, mode, caplog
):
    import ray

    ray_session.release()
    caplog.set_level("INFO", logger="task_runner.ray")
    module = taskrunners.sync if mode == "sync" else taskrunners
    with driving(module.RayTaskRunner(init_kwargs=dict(LOCAL_INIT_KWARGS)), mode) as driver:
        with driver.start():
            assert ray.is_initialized()
            assert ray.get_runtime_context().namespace == "prefect"
            started = ray_processes()
            assert any(p.name() == "raylet" for p in started), started
            assert driver.run(payloads.add, {"x": 1, "y": 2}).result() == 3
        assert not ray.is_initialized()
    assert_all_ended(started, 30, "Ray processes left after the block")
    messages = [record.getMessage() for record in caplog.records]
    assert "Creating a local Ray instance" in messages
    assert "Using Ray cluster with 1 nodes." in messages


def test_leaving_with_an_exception_stops_the_local_instance_without_waiting(ray_session):
    import ray

    ray_session.release()
    runner = taskrunners.sync.RayTaskRunner(init_kwargs=dict(LOCAL_INIT_KWARGS))
    with pytest.raises(LookupError, match="from the body"):
        with runner.start():
            started = ray_processes()
            futures = [
                runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 600}),
                runner.submit(TaskRun(), payloads.async_sleep_then_return, {"seconds": 600}),
                runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 600}),
            ]
            raise LookupError("from the body")
    assert not ray.is_initialized()
    for future in futures:
        state = runner.wait(future, timeout=0)
        assert state.is_crashed() and state.message == CANCELLED
    assert_all_ended(started, 30, "Ray processes left after the block")


@pytest.mark.timeout(300)
def test_fresh_machine_defaults_token_auth_and_dashboard_on_loopback(tmp_path):
    """No token and no RAY_* settings, as on a fresh machine: Ray's defaults just work."""
    report = join_script(env=clean_env(HOME=str(tmp_path)), timeout=280)
    assert report["results"] == [20, 21, "async"]
    assert not report["imported_ray_early"]
    assert not report["initialized_after"]
    # ray.init turned token authentication on, and made the token the runner then used.
    assert (tmp_path / ".ray" / "auth_token").exists()
    assert "Creating a local Ray instance" in report["log"]
    assert any(line.startswith("The Ray UI is available at http://127.0.0.1:") for line in report["log"])


# -- runners joining the shared instance ----------------------------------------------------


@RAY_KIND
def test_a_runner_joining_initialised_ray_leaves_it_running(driver, ray_session, caplog):
    import ray

    caplog.set_level("INFO", logger="task_runner.ray")
    ray_session.shared()
    gcs_address = ray.get_runtime_context().gcs_address
    with driver.start():
        assert driver.run(payloads.return_value, {"value": "joined"}).result() == "joined"
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == gcs_address
    messages = [record.getMessage() for record in caplog.records]
    assert "Joining the Ray instance this process is already connected to" in messages
    assert "Using Ray cluster with 1 nodes." in messages
    # And the next runner still finds it.
    with driver.start():
        assert driver.run(payloads.return_value, {"value": "again"}).result() == "again"


@RAY_KIND
def test_an_unpickled_started_runner_refuses_to_submit_and_wait(driver):
    with driver.start():
        future = driver.submit(payloads.return_value, {"value": 1})
        driver.wait(future)
        copy = cloudpickle.loads(cloudpickle.dumps(driver.runner))
        future_copy = cloudpickle.loads(cloudpickle.dumps(future))
        copy_driver = driver.for_runner(copy)
        with pytest.raises(RuntimeError, match="cannot be used to submit work after serialization"):
            copy_driver.submit(payloads.return_value, {"value": 2})
        future_copy.task_runner = copy
        with pytest.raises(RuntimeError, match="cannot be used to wait for work after serialization"):
            copy_driver.wait(future_copy)


@pytest.mark.timeout(120)  # the failure this guards against is calls that hold Ray's CPUs
def test_leaving_a_joined_ray_with_an_exception_stops_coroutine_and_queued_calls(ray_session):
    import ray

    ray_session.shared()
    runner = taskrunners.sync.RayTaskRunner()
    with pytest.raises(KeyError):
        with runner.start():
            # Both CPUs of the shared instance, and one call waiting for a CPU.
            running = [
                runner.submit(TaskRun(), payloads.async_sleep_then_return, {"seconds": 600})
                for _ in range(2)
            ]
            queued = runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 600})
            runner.wait(running[-1], timeout=2)  # let them start
            raise KeyError("stop")
    assert ray.is_initialized()
    for future in [*running, queued]:
        state = runner.wait(future, timeout=0)
        assert state.is_crashed() and state.message == CANCELLED
    # The CPUs are free again: new calls run.
    with runner.start():
        assert runner.wait(runner.submit(TaskRun(), payloads.add, {"x": 1, "y": 1})).result() == 2
        assert runner.wait(runner.submit(TaskRun(), payloads.add, {"x": 2, "y": 2})).result() == 4
    # The calls ended in their workers: interrupted, or cancelled before they started.
    for future in running:
        try:
            value = ray.get(call_of(future).ref, timeout=30)
        except ray.exceptions.TaskCancelledError:
            continue
        assert value[0] == "CRASHED"


def test_an_address_other_than_the_current_connection_is_refused(ray_session):
    import ray

    ray_session.shared()
    current = ray.get_runtime_context().gcs_address
    runner = taskrunners.sync.RayTaskRunner(address="127.0.0.1:1")
    with pytest.raises(RuntimeError) as info:
        with runner.start():
            pass
    assert current in str(info.value) and "address='127.0.0.1:1'" in str(info.value)
    assert "ray.shutdown()" in str(info.value)
    assert not runner.is_started and ray.is_initialized()


def test_remote_options_ray_refuses_fail_the_start(ray_session):
    ray_session.shared()
    runner = taskrunners.sync.RayTaskRunner(remote_options={"no_such_option": 1})
    with pytest.raises(ValueError, match="Ray refused `remote_options="):
        with runner.start():
            pass
    assert not runner.is_started


def test_each_run_fn_is_wrapped_and_exported_once(ray_session, monkeypatch):
    import ray

    ray_session.shared()
    wrapped = []
    real_remote = ray.remote

    def spy(*args, **kwargs):
        made = real_remote(*args, **kwargs)
        if args and callable(args[0]):
            wrapped.append(args[0].__name__)
            return made

        def decorate(function):
            wrapped.append(function.__name__)
            return made(function)

        return decorate

    monkeypatch.setattr(ray, "remote", spy)

    def local_fn(value):
        return Completed(data=value)

    runner = taskrunners.sync.RayTaskRunner()
    with runner.start():
        futures = [runner.submit(TaskRun(), payloads.return_value, {"value": i}) for i in range(30)]
        futures += [runner.submit(TaskRun(), payloads.add, {"x": i, "y": 1}) for i in range(10)]
        futures += [runner.submit(TaskRun(), local_fn, {"value": i}) for i in range(5)]
        assert [runner.wait(f).result() for f in futures] == [
            *range(30), *range(1, 11), *range(5)
        ]
        assert sorted(name for name in wrapped if name != "run_call") == [
            "add", "local_fn", "return_value"
        ]
        functions = runner._sender.functions
        assert len(functions._entries) == 3
        del local_fn
        gc.collect()
        assert len(functions._entries) == 2, "the wrapper must go with its run_fn"
        # A run_fn that cannot be a weak key is wrapped for each call, and runs.
        unhashable = [ray_payloads.Unhashable(), ray_payloads.Unhashable()]
        assert [runner.wait(runner.submit(TaskRun(), fn, {"value": i})).result()
                for i, fn in enumerate(unhashable)] == [0, 1]
        assert wrapped.count("Unhashable") == 2 and len(functions._entries) == 2


def test_a_ref_without_the_private_completion_callback_is_followed_through_its_future(
    ray_session,
):
    """ray_private.on_ref_done's fallback, for a Ray whose ObjectRef has no _on_completed."""
    import ray

    ray_session.shared()

    class WithoutPrivateCallback:  # passes future() through to the real ObjectRef
        def __init__(self, ref):
            self.ref = ref

        def future(self):
            return self.ref.future()

    def fail():
        raise LookupError("from the task")

    outcomes = queue.Queue()
    ray_private.on_ref_done(WithoutPrivateCallback(ray.remote(payloads.add).remote(1, 2)), outcomes.put)
    assert outcomes.get(timeout=60).result() == 3
    ray_private.on_ref_done(WithoutPrivateCallback(ray.remote(fail).remote()), outcomes.put)
    error = outcomes.get(timeout=60)
    assert isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, LookupError)


def test_upstream_futures_reach_ray_as_object_refs(ray_session, monkeypatch):
    ray_session.shared()
    runner = taskrunners.sync.RayTaskRunner()
    sent = []
    with_refs = runner._with_upstream_refs

    def spy(run_kwargs):
        kwargs, refs = with_refs(run_kwargs)
        sent.append(refs)
        return kwargs, refs

    monkeypatch.setattr(runner, "_with_upstream_refs", spy)
    with runner.start():
        upstream = runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 1, "value": 41})
        downstream = runner.submit(TaskRun(), payloads.add_upstream, {"upstream": upstream, "y": 1})
        # Held here, holding no worker, until the upstream is done; then handed to Ray
        # with the upstream's ObjectRef as an argument, read from the object store.
        assert call_of(downstream).ref is None and not call_of(downstream).running()
        assert runner.wait(downstream).result() == 42
    assert sent == [[(call_of(upstream).ref, None, False)]]  # the ref, no place in a batch, small


def test_a_dead_upstream_reaches_its_downstream_as_a_crashed_state(ray_session, tmp_path):
    ray_session.shared()
    died, received = str(tmp_path / "died"), str(tmp_path / "received")
    runner = taskrunners.sync.RayTaskRunner()
    with runner.start():
        upstream = runner.submit(TaskRun(), ray_payloads.die, {"how": "exit", "marker": died})
        downstream = runner.submit(
            TaskRun(), ray_payloads.receive_and_record, {"states": [upstream], "marker": received}
        )
        further = runner.submit(TaskRun(), payloads.receive_states, {"states": downstream})
        state = runner.wait(further)
    inner = state.result().result()
    assert inner[0].is_crashed() and "died mid-call" in inner[0].message
    assert len(lines(died)) == 1 and len(lines(received)) == 1


@RAY_KIND
def test_a_killed_worker_gives_a_crashed_state_and_the_runner_keeps_working(driver, tmp_path):
    markers = {how: str(tmp_path / how) for how in ("exit", "kill")}
    with driver.start():
        dying = {how: driver.submit(ray_payloads.die, {"how": how, "marker": marker}) for how, marker in markers.items()}
        fine = driver.submit(payloads.return_value, {"value": "fine"})
        states = {how: driver.wait(future) for how, future in dying.items()}
        assert driver.wait(fine).result() == "fine"
        assert driver.run(payloads.return_value, {"value": "after"}).result() == "after"
    for how, state in states.items():
        assert state.is_crashed(), state
        error = state.result(raise_on_failure=False)
        assert type(error).__name__ == "WorkerCrashedError"
        assert state.message == (
            f"The Ray worker process running call {dying[how].task_run.name!r} died mid-call "
            f"(killed, or it exited); the call was not retried (max_retries=0). Ray: "
            f"WorkerCrashedError: {error}"
        )
        # Never run a second time: max_retries=0.
        assert len(lines(markers[how])) == 1, how


def test_per_call_options_in_the_blocking_twin(ray_session):
    ray_session.shared()
    runner = taskrunners.sync.RayTaskRunner()

    def held():
        return runner.wait(runner.submit(TaskRun(), ray_payloads.assigned_resources, {})).result()

    with runner.start():
        assert held() == {"CPU": 1.0}
        with ray_options(num_cpus=2):
            assert held() == {"CPU": 2.0}
            with ray_options(resources={"test-slot": 1}, memory=64 * 1024**2):
                assert held() == {"CPU": 2.0, "test-slot": 1.0, "memory": 64 * 1024**2}
        with ray_options(num_cpus=0.5):
            assert held() == {"CPU": 0.5}
        assert held() == {"CPU": 1.0}
    # The runner's own defaults.
    with taskrunners.sync.RayTaskRunner(remote_options={"num_cpus": 0.25}).start() as runner:
        assert held() == {"CPU": 0.25}
        with ray_options(num_cpus=1):
            assert held() == {"CPU": 1.0}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_per_call_options_in_the_facade_follow_the_async_task(ray_session, backend):
    ray_session.shared()

    async def main():
        results = {}
        async with taskrunners.RayTaskRunner().start() as runner:

            async def submit_with(key, cpus):
                with ray_options(num_cpus=cpus):
                    future = await runner.submit(TaskRun(), ray_payloads.assigned_resources, {})
                await anyio.sleep(0.01)  # the other task runs meanwhile with its own options
                results[key] = (await runner.wait(future)).result()

            async with anyio.create_task_group() as group:
                group.start_soon(submit_with, "two", 2)
                group.start_soon(submit_with, "half", 0.5)
            plain = await runner.submit(TaskRun(), ray_payloads.assigned_resources, {})
            results["plain"] = (await runner.wait(plain)).result()
        return results

    assert anyio.run(main, backend=backend) == {
        "two": {"CPU": 2.0},
        "half": {"CPU": 0.5},
        "plain": {"CPU": 1.0},
    }


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_a_call_asking_for_more_than_any_node_has_is_crashed_at_once(ray_session):
    ray_session.shared()
    runner = taskrunners.sync.RayTaskRunner()
    with runner.start():
        with ray_options(num_cpus=64):
            too_many_cpus = runner.wait(runner.submit(TaskRun(), payloads.return_value, {}))
        with ray_options(num_gpus=1):
            no_gpu = runner.wait(runner.submit(TaskRun(), payloads.return_value, {}))
        with ray_options(resources={"unicorn": 1}):
            no_unicorn = runner.wait(runner.submit(TaskRun(), payloads.return_value, {}))
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": 1})).result() == 1
    for state, wanted in ((too_many_cpus, "'CPU': 64"), (no_gpu, "'GPU': 1"), (no_unicorn, "'unicorn': 1")):
        assert state.is_crashed(), state
        assert "can never be scheduled" in state.message and wanted in state.message
        assert "largest node has" in state.message and "'CPU': 2.0" in state.message
        error = state.result(raise_on_failure=False)
        assert type(error) is ValueError
        assert state.message == f"The call can never be scheduled: {error}"
    # A runner whose defaults no node meets: every call says so.
    with taskrunners.sync.RayTaskRunner(remote_options={"num_cpus": 3}).start() as runner:
        state = runner.wait(runner.submit(TaskRun(), payloads.return_value, {}))
        assert state.is_crashed() and "'CPU': 3" in state.message


# -- a head started with `ray start --head` ------------------------------------------------


@pytest.mark.timeout(600)
def test_the_standard_suite_on_an_external_head(ray_head):
    """The standard suite in a subprocess (one Ray connection per process), against the head."""
    env = clean_env(**{HEAD_ENV: ray_head.address})
    suite = ["-m", "pytest", "tests/test_standard.py", "-m", "ray", "-q"]
    collected = run_script(*suite, "--collect-only", env=env).strip().splitlines()
    ids = [line for line in collected if "::" in line]
    assert ids and all("ray-head" in line for line in ids), collected[-5:]
    output = run_script(*suite, env=env, timeout=560)
    summary = output.strip().splitlines()[-1]
    assert re.search(rf"\b{len(ids)} passed", summary), output[-3000:]
    assert "failed" not in summary and "error" not in summary, output[-3000:]


def test_a_runner_given_the_head_address_connects_and_leaves_it_running(ray_head):
    """Token authentication is on at the head; RAY_AUTH_MODE is not set for the runner."""
    before = {p.pid for p in ray_head.processes() if p.name() in ("gcs_server", "raylet")}
    report = join_script("--address", ray_head.address, "--mode", "trio", env=clean_env())
    assert report["results"] == [20, 21, "async"]
    assert not report["initialized_after"], "the runner must disconnect on exit"
    assert f"Connecting to an existing Ray instance at {ray_head.address}" in report["log"]
    assert "Using Ray cluster with 1 nodes." in report["log"]
    assert ray_head.alive()
    after = {p.pid for p in ray_head.processes() if p.name() in ("gcs_server", "raylet")}
    assert len(before) == 2 and after == before


@pytest.mark.timeout(420)  # the head starts a Ray client server per client: slow when loaded
def test_a_runner_given_a_ray_client_address_connects_and_leaves_it_running(ray_head):
    pytest.importorskip("grpc", reason="ray:// needs Ray's client extra")
    try:
        report = join_script("--address", ray_head.client_address, env=clean_env(), timeout=150)
    except AssertionError as first:
        # Under load the head's proxier can fail to spawn the per-client server (Ray's own
        # start-up timeout), or leave the client waiting for it with nothing printed after
        # "Passing the following kwargs to ray.init() on the server" (seen once in CI):
        # that is Ray's environment, not the runner: one more try.
        if not any(
            sign in str(first)
            for sign in ("Starting Ray client server failed", "did not finish within")
        ):
            raise
        report = join_script("--address", ray_head.client_address, env=clean_env(), timeout=150)
    assert report["results"] == [20, 21, "async"]
    assert not report["initialized_after"]
    assert f"Connecting to an existing Ray instance at {ray_head.client_address}" in report["log"]
    assert ray_head.alive()


# -- recycling workers: Ray's own max_calls (see the README) ---------------------------------


def test_max_calls_in_remote_options_replaces_ray_workers(ray_session):
    ray_session.shared()
    with taskrunners.sync.RayTaskRunner(remote_options={"max_calls": 1}, batch_size=1).start() as runner:
        pids = [runner.wait(runner.submit(TaskRun(), payloads.return_pid, {})).result() for _ in range(3)]
    assert len(set(pids)) == 3, pids
