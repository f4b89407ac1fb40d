"""DaskTaskRunner specifics: configuration, keys, hand-off, failures, pickling, clusters.

The standard suite (tests/test_standard.py) runs on the kinds of tests/support/kinds_dask.py;
these tests cover what only the Dask runner does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import pickle
import re
import threading
import time
import urllib.request
import uuid

import cloudpickle
import psutil
import pytest

import taskrunners
import taskrunners.sync
from taskrunners import TaskConcurrencyType, TaskRun
from taskrunners.states import Completed, StateType
from taskrunners._core.seam import call_of
from tests.support import dask_payloads, payloads
from tests.support.driver import driving
from tests.support.kinds import parametrize_kinds
from tests.support.kinds_dask import (
    EXTERNAL_ALLOWED_FAILURES,
    KINDS,
    PROCESSES_CLUSTER,
    THREADS_CLUSTER,
    read_address,
    start_scheduler,
)
from tests.support.network import free_port, is_loopback, listening_addresses
from tests.support.processes import (
    assert_all_ended,
    family,
    python_environment,
    run_python,
    stop_processes,
)
from tests.support.waiting import wait_for_path, wait_until

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402  (after the skip: dask comes with distributed)

pytestmark = [pytest.mark.dask, pytest.mark.timeout(180)]

THREADS, PROCESSES, EXTERNAL = (next(kind for kind in KINDS if kind.id == name) for name in ("dask-threads", "dask-processes", "dask-external"))
CANCELLED = "Execution was cancelled by the runtime environment."
SyncDask = taskrunners.sync.DaskTaskRunner


def threads_runner(**cluster_kwargs):
    return SyncDask(cluster_kwargs={**THREADS_CLUSTER, **cluster_kwargs})


def key_of(task_run):
    return f"{task_run.name}-{task_run.id.hex}"


# -- configuration (no cluster) -----------------------------------------------------


@pytest.mark.parametrize(
    "option", [{"cluster_class": "distributed.LocalCluster"}, {"cluster_kwargs": {"n_workers": 1}}, {"adapt_kwargs": {"maximum": 2}}]
)
@pytest.mark.parametrize("runner_class", [SyncDask, taskrunners.DaskTaskRunner])
def test_address_with_cluster_options_is_refused(runner_class, option):
    with pytest.raises(ValueError, match=r"`address` \('tcp://127.0.0.1:8786'\).*cannot be given with it"):
        runner_class(address="tcp://127.0.0.1:8786", **option)


@pytest.mark.parametrize("argument", ["client_kwargs", "cluster_kwargs"])
def test_asynchronous_in_kwargs_is_refused(argument):
    with pytest.raises(ValueError, match=f"`{argument}` cannot set `asynchronous`"):
        SyncDask(**{argument: {"asynchronous": True}})
    with pytest.raises(ValueError, match=f"`{argument}` cannot set `asynchronous`"):
        taskrunners.DaskTaskRunner(**{argument: {"asynchronous": False}})


def test_kwargs_are_copied_and_client_defaults_to_not_being_the_default_client():
    cluster_kwargs = {"n_workers": 1}
    adapt_kwargs = {"maximum": 3}
    client_kwargs = {"name": "x"}
    runner = SyncDask(cluster_kwargs=cluster_kwargs, adapt_kwargs=adapt_kwargs, client_kwargs=client_kwargs)
    cluster_kwargs["n_workers"] = 9
    adapt_kwargs["maximum"] = 9
    assert runner.cluster_kwargs == {"n_workers": 1} and runner.cluster_kwargs is not cluster_kwargs
    assert runner.adapt_kwargs == {"maximum": 3} and runner.adapt_kwargs is not adapt_kwargs
    assert runner.client_kwargs == {"name": "x", "set_as_default": False}
    assert client_kwargs == {"name": "x"}
    assert SyncDask().client_kwargs == {"set_as_default": False}
    assert SyncDask(client_kwargs={"set_as_default": True}).client_kwargs == {"set_as_default": True}
    assert (SyncDask().cluster_kwargs, SyncDask().adapt_kwargs) == ({}, {})


def test_the_facade_exposes_the_same_settings():
    runner = taskrunners.DaskTaskRunner(cluster_kwargs={"processes": True}, client_kwargs={"name": "y"})
    assert runner.cluster_kwargs == {"processes": True}
    assert runner.client_kwargs == {"name": "y", "set_as_default": False}
    assert runner.address is None and runner.cluster_class is None


def test_a_cluster_class_name_is_imported_at_construction():
    assert SyncDask(cluster_class="distributed.LocalCluster").cluster_class is distributed.LocalCluster
    assert SyncDask(cluster_class="distributed.deploy.local:LocalCluster").cluster_class is distributed.LocalCluster
    assert SyncDask(cluster_class=distributed.LocalCluster).cluster_class is distributed.LocalCluster
    with pytest.raises(ValueError, match="`cluster_class` 'distributed.NoSuchCluster' could not be imported"):
        SyncDask(cluster_class="distributed.NoSuchCluster")
    with pytest.raises(ValueError, match="'no_such_module_xyz.Cluster' could not be imported"):
        SyncDask(cluster_class="no_such_module_xyz.Cluster")


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"cluster_kwargs": [("n_workers", 1)]}, TypeError),
        ({"client_kwargs": "set_as_default"}, TypeError),
        ({"cluster_class": 42}, TypeError),
        ({"connect_timeout": 0}, ValueError),
        ({"connect_timeout": "10"}, ValueError),
    ],
)
def test_bad_arguments_name_themselves(kwargs, exc):
    (name,) = kwargs
    with pytest.raises(exc, match=f"`{name}`"):
        SyncDask(**kwargs)


class FixedCluster:
    """A cluster class whose keyword arguments are all named."""

    def __init__(self, n_workers=1, scheduler_options=None):
        pass


class AnyCluster:
    """A cluster class taking any keyword (**kwargs it does not pass to a known class)."""

    def __init__(self, **kwargs):
        pass


class WorkersCluster(distributed.LocalCluster):
    """A LocalCluster subclass passing its **kwargs on to LocalCluster."""

    def __init__(self, flavour="plain", **kwargs):
        super().__init__(**kwargs)


LOCAL = "distributed.LocalCluster or the workers it creates"


@pytest.mark.parametrize("runner_class", [SyncDask, taskrunners.DaskTaskRunner], ids=["twin", "facade"])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"cluster_kwargs": {"n_worker": 2}},
            f"`cluster_kwargs` has a key not taken by {LOCAL} (distributed.Nanny): 'n_worker' (did "
            "you mean 'n_workers'?). Correct or remove it.",
        ),
        (
            {"cluster_kwargs": {"processes": False, "threads_per_workers": 1, "memory_limt": "1GB"}},
            f"`cluster_kwargs` has keys not taken by {LOCAL} (distributed.Worker): "
            "'threads_per_workers' (did you mean 'threads_per_worker'?), 'memory_limt' (did you "
            "mean 'memory_limit'?). Correct or remove them.",
        ),
        (
            {"cluster_class": "distributed.LocalCluster", "cluster_kwargs": {"dashbord_address": None}},
            f"`cluster_kwargs` has a key not taken by {LOCAL} (distributed.Nanny): "
            "'dashbord_address' (did you mean 'dashboard_address'?). Correct or remove it.",
        ),
        (
            {"cluster_class": WorkersCluster, "cluster_kwargs": {"flavor": "x"}},
            "`cluster_kwargs` has a key not taken by tests.test_dask.WorkersCluster or the workers "
            "it creates (distributed.Nanny): 'flavor' (did you mean 'flavour'?). Correct or remove it.",
        ),
        (
            {"cluster_class": FixedCluster, "cluster_kwargs": {"n_workers": 1, "flux": 2}},
            "`cluster_kwargs` has a key not taken by tests.test_dask.FixedCluster: 'flux' (nothing "
            "close to it). Correct or remove it; the keys taken are n_workers, scheduler_options.",
        ),
        (
            {"client_kwargs": {"set_as_defualt": True}},
            "`client_kwargs` has a key not taken by distributed.Client: 'set_as_defualt' (did you "
            "mean 'set_as_default'?). Correct or remove it.",
        ),
        (
            {"address": "tcp://127.0.0.1:8786", "client_kwargs": {"time_out": 3}},
            "`client_kwargs` has a key not taken by distributed.Client: 'time_out' (did you mean "
            "'timeout'?). Correct or remove it.",
        ),
    ],
    ids=["local", "threads", "by-name", "subclass", "own-class", "client", "client-address"],
)
def test_a_key_the_cluster_or_client_does_not_take_is_refused_at_construction(
    runner_class, kwargs, message
):
    with pytest.raises(TypeError) as caught:
        runner_class(**kwargs)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        # LocalCluster's own keywords, and those it passes to its Nanny workers and
        # on to their Worker (and to the server a Worker is).
        {
            "cluster_kwargs": {
                "processes": True, "n_workers": 2, "threads_per_worker": 1, "memory_limit": "1GB",
                "dashboard_address": None, "host": "127.0.0.1", "lifetime": "1h", "resources": {"GPU": 1},
                "silence_logs": logging.ERROR, "nthreads": 1, "security": None, "protocol": "tcp://",
                "worker_class": distributed.Nanny, "scheduler_kwargs": {}, "interface": None,
                "worker_dashboard_address": None, "env": {}, "local_directory": "/tmp",
                "death_timeout": 5, "lifetime_stagger": "1s", "preload": [], "heartbeat_interval": "1s",
                "connection_limit": 8, "worker_port": 0, "name": "x", "ip": None,
            },
        },
        {"cluster_kwargs": {"processes": False, "executor": None, "validate": False, "timeout": 3}},
        {"cluster_kwargs": {"worker_class": distributed.Worker, "lifetime_restart": False}},
        {"cluster_kwargs": {"worker_class": "any.thing", "anything": 1}},  # LocalCluster will say
        {"cluster_class": WorkersCluster, "cluster_kwargs": {"flavour": "x", "n_workers": 1}},
        {"cluster_class": AnyCluster, "cluster_kwargs": {"whatever": 1}},
        {"cluster_class": "distributed.SpecCluster", "cluster_kwargs": {"workers": {}, "scheduler": None}},
        {"client_kwargs": {"name": "y", "timeout": 3, "direct_to_workers": True, "serializers": None}},
    ],
    ids=["local", "threads", "worker-class", "worker-class-name", "subclass", "any", "spec", "client"],
)
def test_every_key_the_cluster_or_client_takes_passes(kwargs):
    SyncDask(**kwargs)
    taskrunners.DaskTaskRunner(**kwargs)


KEYS_CHECKED_AT_CONSTRUCTION = """
import sys, taskrunners.sync

Dask = taskrunners.sync.DaskTaskRunner
Dask()
Dask(address="tcp://127.0.0.1:8786")
print("nothing to check", "distributed" in sys.modules)
for kwargs in ({"cluster_kwargs": {"n_worker": 1}}, {"client_kwargs": {"nme": "x"}}):
    try:
        Dask(**kwargs)
    except TypeError as exc:
        print(exc)
"""


def test_keys_are_checked_at_construction_importing_distributed_only_then():
    result = run_python("-c", KEYS_CHECKED_AT_CONSTRUCTION, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "nothing to check False",
        f"`cluster_kwargs` has a key not taken by {LOCAL} (distributed.Nanny): 'n_worker' (did "
        "you mean 'n_workers'?). Correct or remove it.",
        "`client_kwargs` has a key not taken by distributed.Client: 'nme' (did you mean 'name'?). "
        "Correct or remove it.",
    ]


@pytest.mark.parametrize(
    "cluster_kwargs, expected",
    [
        ({}, TaskConcurrencyType.CONCURRENT),
        ({"processes": False}, TaskConcurrencyType.CONCURRENT),
        ({"processes": True}, TaskConcurrencyType.PARALLEL),
    ],
)
def test_concurrency_type_follows_processes(cluster_kwargs, expected):
    assert SyncDask(cluster_kwargs=cluster_kwargs).concurrency_type is expected
    assert taskrunners.DaskTaskRunner(cluster_kwargs=cluster_kwargs).concurrency_type is expected
    assert SyncDask(address="tcp://127.0.0.1:8786").concurrency_type is TaskConcurrencyType.CONCURRENT


def test_import_taskrunners_imports_neither_dask_nor_distributed():
    result = run_python(
        "-c",
        "import sys, taskrunners, taskrunners.sync\n"
        "taskrunners.DaskTaskRunner()  # settings to check would import it\n"
        "taskrunners.sync.DaskTaskRunner(address='tcp://127.0.0.1:8786')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_distributed_gives_the_documented_error_on_start():
    result = run_python(
        "-c",
        "import sys\n"
        "sys.modules['distributed'] = None  # as if not installed\n"
        "import taskrunners.sync\n"
        "runner = taskrunners.sync.DaskTaskRunner(cluster_kwargs={'n_workers': 1})\n"
        "try:\n"
        "    with runner.start():\n"
        "        pass\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
        "print(runner.is_started)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Using the `DaskTaskRunner` requires `distributed` to be installed.",
        "False",
    ]


# -- distributed's private names --------------------------------------------------------


def test_every_private_distributed_name_the_runner_relies_on_is_still_there():
    from taskrunners._core.dask import dask_private

    with threads_runner().start() as runner:
        found = dask_private.required(runner._client, runner._cluster)
    assert set(found) == set(dask_private.__all__) - {"required"}
    missing = sorted(name for name, present in found.items() if not present)
    assert not missing, (
        f"distributed {distributed.__version__} no longer has what these functions of "
        f"taskrunners/_core/dask/dask_private.py use: {', '.join(missing)}. Each now takes its "
        "fallback; update it for this version, or pin distributed below it in setup.cfg."
    )


# -- a temporary cluster ---------------------------------------------------------------


class SpyCluster(distributed.LocalCluster):
    """A LocalCluster recording its constructor kwargs and adapt() calls."""

    made = []

    def __init__(self, **kwargs):
        self.adapt_calls = []
        SpyCluster.made.append(self)
        self.given = dict(kwargs)
        super().__init__(**kwargs)

    def adapt(self, **kwargs):
        self.adapt_calls.append(kwargs)
        return super().adapt(**kwargs)


@pytest.fixture
def spy_cluster():
    SpyCluster.made.clear()
    yield SpyCluster
    SpyCluster.made.clear()


def test_cluster_class_is_none_until_start_then_local_cluster_with_loopback_defaults():
    given = dict(THREADS_CLUSTER)
    runner = SyncDask(cluster_kwargs=given)
    assert runner.cluster_class is None
    with runner.start():
        assert runner.cluster_class is distributed.LocalCluster
        assert type(runner._cluster) is distributed.LocalCluster
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": 1})).result() == 1
    # The user's kwargs stay exactly as given; the loopback defaults were not stored.
    assert runner.cluster_kwargs == THREADS_CLUSTER and given == THREADS_CLUSTER
    assert runner.cluster_class is distributed.LocalCluster


def test_adapt_is_called_only_with_adapt_kwargs(spy_cluster):
    with SyncDask(cluster_class=spy_cluster, cluster_kwargs=dict(THREADS_CLUSTER)).start():
        (without,) = spy_cluster.made
        assert without.adapt_calls == []
    with SyncDask(
        cluster_class=spy_cluster, cluster_kwargs=dict(THREADS_CLUSTER), adapt_kwargs={"minimum": 1, "maximum": 2}
    ).start() as runner:
        _, adapted = spy_cluster.made
        assert adapted.adapt_calls == [{"minimum": 1, "maximum": 2}]
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": 2})).result() == 2


class NotStarted(Exception):
    pass


class RecordOnlyCluster(distributed.LocalCluster):
    """Records its constructor kwargs and raises instead of starting (so nothing listens)."""

    given = []

    def __init__(self, **kwargs):
        RecordOnlyCluster.given.append(dict(kwargs))
        raise NotStarted


def kwargs_given_to_the_cluster(cluster_kwargs):
    RecordOnlyCluster.given.clear()
    with pytest.raises(NotStarted):
        with SyncDask(cluster_class=RecordOnlyCluster, cluster_kwargs=cluster_kwargs).start():
            pass
    (given,) = RecordOnlyCluster.given
    return given


def test_loopback_settings_are_added_only_where_the_user_chose_no_address(spy_cluster, caplog):
    caplog.set_level(logging.INFO, logger="task_runner.dask")
    with SyncDask(cluster_class=spy_cluster, cluster_kwargs=dict(THREADS_CLUSTER)).start():
        pass
    caplog.clear()
    with SyncDask(
        cluster_class=spy_cluster, cluster_kwargs={**THREADS_CLUSTER, "dashboard_address": "127.0.0.1:0"}
    ).start():
        (link,) = dashboard_links(caplog)
        assert ":8787/" not in link
    defaults, chosen = (cluster.given for cluster in spy_cluster.made)
    assert defaults == {**THREADS_CLUSTER, "dashboard_address": "127.0.0.1:8787", "worker_dashboard_address": "127.0.0.1:0"}
    assert chosen == {**THREADS_CLUSTER, "dashboard_address": "127.0.0.1:0", "worker_dashboard_address": "127.0.0.1:0"}
    # An address naming only a port names no host: served on loopback at that port.
    assert kwargs_given_to_the_cluster({"processes": True, "dashboard_address": ":8787"}) == {
        "processes": True,
        "dashboard_address": "127.0.0.1:8787",
    }
    assert kwargs_given_to_the_cluster({"processes": True, "dashboard_address": 0, "worker_dashboard_address": ":0,:9"}) == {
        "processes": True,
        "dashboard_address": "127.0.0.1:0",
        "worker_dashboard_address": "127.0.0.1:0,127.0.0.1:9",
    }
    # The dashboard off: Dask's HTTP endpoints still listen, on loopback; LocalCluster
    # still sees None (and keeps the dashboard off); the user's scheduler_kwargs stay.
    assert kwargs_given_to_the_cluster({"dashboard_address": None, "scheduler_kwargs": {"idle_timeout": "1h"}}) == {
        "dashboard_address": None,
        "scheduler_kwargs": {"idle_timeout": "1h", "dashboard_address": "127.0.0.1:0"},
    }
    # A loopback host is no choice of exposure; a host or dashboard host beyond it is.
    assert kwargs_given_to_the_cluster({"processes": True, "host": "127.0.0.1"}) == {
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:8787",
    }
    assert kwargs_given_to_the_cluster({"host": "192.0.2.10"}) == {"host": "192.0.2.10"}
    assert kwargs_given_to_the_cluster({"processes": False, "dashboard_address": "0.0.0.0:8787"}) == {
        "processes": False,
        "dashboard_address": "0.0.0.0:8787",
        "worker_dashboard_address": "127.0.0.1:0",
    }


DASHBOARD_LINK = re.compile(r"The Dask dashboard is available at (http://127\.0\.0\.1:\d+/status)$")


def dashboard_links(caplog):
    """The dashboard links the Dask runners logged, in order."""
    messages = [record.getMessage() for record in caplog.records if record.name == "task_runner.dask"]
    return [found[1] for found in map(DASHBOARD_LINK.match, messages) if found]


def read_json(url):
    """The JSON document at ``url``, fetched directly (no proxy)."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=60) as response:
        return json.load(response)


def worker_address():
    import distributed

    return Completed(data=distributed.get_worker().address)


def test_a_threads_cluster_listens_on_loopback_only():
    before = set(listening_addresses())
    with threads_runner().start() as runner:
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": 3})).result() == 3
        opened = [entry for entry in listening_addresses() if entry not in before]
    assert opened, "the dashboard at least should listen"
    exposed = [entry for entry in opened if not is_loopback(entry[1])]
    assert not exposed


def test_the_dashboard_link_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="task_runner.dask")
    with threads_runner().start() as runner:
        # Dask's own link names this machine's IP; the dashboard listens on loopback only.
        (link,) = dashboard_links(caplog)
        # The link leads to this cluster's dashboard: it knows the worker that ran a call.
        worker = runner.wait(runner.submit(TaskRun(), worker_address, {})).result()
        assert worker in read_json(link.replace("/status", "/json/identity.json"))["workers"]
    messages = [record.getMessage() for record in caplog.records if record.name == "task_runner.dask"]
    assert any(message.startswith("Creating a new Dask cluster with `distributed.") for message in messages)
    caplog.clear()
    # With the dashboard off there is no dashboard to link to.
    with threads_runner(dashboard_address=None).start():
        pass
    messages = [record.getMessage() for record in caplog.records if record.name == "task_runner.dask"]
    assert messages and not any("dashboard" in message for message in messages)


def test_two_runners_at_once_both_work_and_the_dashboard_port_collision_only_warns(caplog):
    caplog.set_level(logging.INFO, logger="task_runner.dask")
    # Both ask for one dashboard port, as two runners with the default 8787 do.
    dashboard = f"127.0.0.1:{free_port()}"
    outer, inner = threads_runner(dashboard_address=dashboard), threads_runner(dashboard_address=dashboard)
    with outer.start():
        first = outer.submit(TaskRun(), payloads.return_value, {"value": "outer"})
        with pytest.warns(UserWarning, match="already in use"):
            inner_block = inner.start()
            inner_block.__enter__()
        try:
            outer_link, inner_link = dashboard_links(caplog)
            assert inner_link != outer_link
            second = inner.submit(TaskRun(), payloads.add_upstream, {"upstream": first, "y": "+inner"})
            assert inner.wait(second).result() == "outer+inner"
        finally:
            inner_block.__exit__(None, None, None)
        assert outer.wait(first).result() == "outer"
        assert outer.wait(outer.submit(TaskRun(), payloads.return_value, {"value": 5})).result() == 5


# -- keys, hand-off, annotations -----------------------------------------------------------


@parametrize_kinds([THREADS])
def test_the_key_read_on_the_worker_is_name_and_run_id(driver):
    task_run = TaskRun(name="load-data")
    with driver.start():
        key = driver.wait(driver.submit(dask_payloads.current_key, task_run=task_run)).result()
    assert key == f"load-data-{task_run.id.hex}"


def test_a_task_run_submitted_twice_runs_once():
    task_run = TaskRun()
    with threads_runner().start() as runner:
        first = runner.submit(task_run, dask_payloads.fresh_token, {})
        second = runner.submit(task_run, dask_payloads.fresh_token, {})
        assert runner.wait(first).result() == runner.wait(second).result()


def dependencies(client, key):
    return client.run_on_scheduler(
        lambda dask_scheduler: sorted(dep.key for dep in dask_scheduler.tasks[key].dependencies)
    )


@parametrize_kinds([THREADS, PROCESSES])
def test_upstream_futures_reach_dask_as_dask_futures_and_their_states_arrive_intact(kind, request):
    runner = kind.make(request, blocking=True)
    up_run, down_run = TaskRun(name="up"), TaskRun(name="down")
    with runner.start():
        up = runner.submit(up_run, payloads.fail_with, {"value": "upstream broke"})
        down = runner.submit(down_run, payloads.receive_states, {"states": {"nested": [up, (up,)]}})
        received = runner.wait(down).result()
        assert dependencies(runner._client, key_of(down_run)) == [key_of(up_run)]
    first, (second,) = received["nested"]
    for state in (first, second):
        assert state.type is StateType.FAILED
        assert state.message == "it failed"
        assert type(state.data) is ValueError and state.data.args == ("upstream broke",)


def test_upstream_futures_of_another_runner_arrive_as_states_and_keep_annotations():
    with taskrunners.sync.ConcurrentTaskRunner().start() as other, threads_runner().start() as runner:
        foreign = other.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 0.5, "value": 40})
        own = runner.submit(TaskRun(), payloads.return_value, {"value": 2})
        down_run = TaskRun()
        with dask.annotate(priority=3):
            down = runner.submit(down_run, payloads.add_upstream, {"upstream": foreign, "y": 1})
        both = runner.submit(TaskRun(), payloads.receive_states, {"states": [foreign, own]})
        assert runner.wait(down).result() == 41
        foreign_state, own_state = runner.wait(both).result()
        assert (foreign_state.result(), own_state.result()) == (40, 2)
        annotations, _ = annotations_of(runner._client, key_of(down_run))
        assert annotations.get("priority") == 3


def test_mapped_calls_with_running_upstream_calls_are_handed_dask_futures_with_annotations():
    from taskrunners._core import seam
    from taskrunners._core.calls import block_until_done

    with threads_runner().start() as runner:
        up = runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 0.5, "value": 40})
        down_run = TaskRun()
        with dask.annotate(priority=3):
            (down_future,) = seam.submit_many(runner, [down_run], payloads.add_upstream, [{"upstream": up, "y": 1}])
        down = seam.call_of(down_future)
        # Handed the upstream's Dask future, not waited for here and sent from the loop.
        assert down.dask_future is not None and down.key == key_of(down_run)
        block_until_done([down])
        assert down.result().result() == 41
        annotations, _ = annotations_of(runner._client, key_of(down_run))
        assert annotations.get("priority") == 3


def annotations_of(client, key):
    def read(dask_scheduler):
        task = dask_scheduler.tasks[key]
        return dict(task.annotations), task.resource_restrictions

    return client.run_on_scheduler(read)


@pytest.fixture
def resources_driver(mode):
    """A threads cluster whose workers have 4 "slots", driven in each mode."""
    cluster_kwargs = {**THREADS_CLUSTER, "resources": {"slots": 4}}
    module = taskrunners.sync if mode == "sync" else taskrunners
    with driving(module.DaskTaskRunner(cluster_kwargs=cluster_kwargs), mode) as driver:
        yield driver


def test_dask_annotate_around_a_submission_applies_to_that_call(resources_driver):
    driver = resources_driver
    runner = driver.runner
    runner_core = runner if driver.blocking else runner._core
    annotated, plain = TaskRun(), TaskRun()

    async def submit_annotated():
        with dask.annotate(resources={"slots": 1}, priority=7, retries=2):
            return await runner.submit(annotated, payloads.return_value, {"value": "a"})

    with driver.start():
        if driver.blocking:
            with dask.annotate(resources={"slots": 1}, priority=7, retries=2):
                first = runner.submit(annotated, payloads.return_value, {"value": "a"})
        else:
            first = driver.portal.call(submit_annotated)
        second = driver.submit(payloads.return_value, {"value": "b"}, task_run=plain)
        assert driver.wait(first).result() == "a" and driver.wait(second).result() == "b"
        client = runner_core._client
        annotations, restrictions = annotations_of(client, key_of(annotated))
        assert annotations["priority"] == 7 and annotations["retries"] == 2
        assert annotations["resources"] == {"slots": 1} and restrictions == {"slots": 1}
        plain_annotations, plain_restrictions = annotations_of(client, key_of(plain))
        assert "priority" not in plain_annotations and not plain_restrictions


def test_dask_retries_apply_to_a_call_that_raises(tmp_path):
    flaky, broken = tmp_path / "flaky", tmp_path / "broken"
    flaky.mkdir()
    broken.mkdir()
    with threads_runner().start() as runner:
        with dask.annotate(retries=2):
            recovered = runner.submit(TaskRun(), dask_payloads.fail_until, {"directory": str(flaky), "failures": 2})
        with dask.annotate(retries=1):
            gave_up = runner.submit(TaskRun(), dask_payloads.fail_until, {"directory": str(broken), "failures": 5})
        downstream = runner.submit(TaskRun(), payloads.receive_states, {"states": gave_up})
        assert runner.wait(recovered).result() == 3
        state = runner.wait(gave_up)
        assert state.is_crashed()
        assert state.message == "Execution was interrupted by an unexpected exception."
        assert str(state.result(raise_on_failure=False)) == "attempt 2 fails"
        # The downstream call still runs, with the crashed State of its upstream.
        assert runner.wait(downstream).result().is_crashed()
        without = runner.submit(TaskRun(), dask_payloads.fail_until, {"directory": str(tmp_path), "failures": 9})
        assert runner.wait(without).is_crashed()
    assert len(os.listdir(broken)) == 2


def test_an_unpicklable_argument_crashes_the_call_at_once():
    with threads_runner().start() as runner:
        future = runner.submit(TaskRun(), payloads.return_value, {"value": threading.Lock()})
        assert taskrunners.wait([future], timeout=0).done == {future}
        state = runner.wait(future)
    assert state.is_crashed()
    assert state.message == (
        "The call's function or arguments could not be pickled: "
        "TypeError(\"cannot pickle '_thread.lock' object\")."
    )
    error = state.result(raise_on_failure=False)
    assert type(error) is TypeError and str(error) == "cannot pickle '_thread.lock' object"


@parametrize_kinds([PROCESSES, EXTERNAL])
def test_an_unpicklable_result_crashes_with_the_pickling_error_itself(kind, request):
    try:
        pickle.dumps(threading.Lock())
    except Exception as exc:
        expected = exc
    runner = kind.make(request, blocking=True)
    with runner.start():
        locked = runner.submit(TaskRun(name="locked"), payloads.return_unpicklable, {})
        downstream = runner.submit(TaskRun(), payloads.receive_states, {"states": locked})
        state = runner.wait(locked)
        received = runner.wait(downstream).result()
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": "ok"})).result() == "ok"
    assert state.is_crashed()
    error = state.result(raise_on_failure=False)
    assert type(error) is type(expected) and str(error) == str(expected)
    assert "could not be pickled to send it back from the Dask worker" in state.message
    assert "cannot pickle '_thread.lock' object" in state.message and "cloudpickle" in state.message
    assert received.is_crashed() and received.message == state.message


# -- cancelling calls, as concurrent.futures does -----------------------------------------------


def occupy_every_worker(runner, directory, release):
    """Submit one long call to each worker of a started runner (its only thread) and
    wait until all have started; they end once the file ``release`` exists."""
    workers = sorted(runner._client.scheduler_info(n_workers=-1)["workers"])
    long_runs = []
    for index, worker in enumerate(workers):
        with dask.annotate(workers=[worker]):
            long_runs.append(
                runner.submit(
                    TaskRun(name=f"long-{index}"),
                    payloads.run_once_gate_opens,
                    {"marker": str(directory / f"started-{index}"), "gate": str(release), "value": index},
                )
            )
    started = [directory / f"started-{index}" for index in range(len(workers))]
    wait_until(lambda: all(path.exists() for path in started), 120, "the long calls did not all start")
    return long_runs


@pytest.fixture
def busy_processes_runner(tmp_path):
    """A started 2-worker process cluster whose only two threads run a long call each.

    Yields (runner, the two long futures, the release file that ends them).
    """
    release = tmp_path / "release"
    runner = SyncDask(cluster_kwargs=dict(PROCESSES_CLUSTER))
    with runner.start():
        long_runs = occupy_every_worker(runner, tmp_path, release)
        try:
            yield runner, long_runs, release
        finally:
            release.touch()


def submit_recorded(runner, directory, name):
    return runner.submit(TaskRun(name=name), dask_payloads.record_run, {"directory": str(directory), "name": name})


def assert_cancelled(runner, future):
    call = call_of(future)
    assert call.cancelled() and call.done() and not call.running()
    state = runner.wait(future)
    assert state.is_crashed() and state.message == CANCELLED
    assert type(state.result(raise_on_failure=False)) is concurrent.futures.CancelledError


@pytest.mark.timeout(240)
def test_cancel_stops_only_calls_no_worker_started_and_running_tells_which(busy_processes_runner, tmp_path):
    runner, long_runs, release = busy_processes_runner
    ran = tmp_path / "ran"
    ran.mkdir()
    # With Dask's default worker-saturation the first two typically wait on a worker,
    # the others in the scheduler's queue, on no worker yet.
    queued = [submit_recorded(runner, ran, f"queued-{index}") for index in range(4)]
    started, waiting = call_of(long_runs[0]), call_of(queued[0])
    # The marker file is written after the worker marked the call started.
    assert started.running() and not waiting.running()
    # A started call is not cancelled: it runs to its end.
    assert started.cancel() is False
    assert not started.cancelled() and started.running()
    # A call no worker has started is cancelled, and never runs.
    assert waiting.cancel() is True
    assert waiting.cancel() is True  # as concurrent.futures: cancelled already
    assert call_of(queued[2]).cancel() is True
    assert_cancelled(runner, queued[0])
    assert_cancelled(runner, queued[2])
    release.touch()
    assert [runner.wait(future).result() for future in long_runs] == [0, 1]
    assert [runner.wait(queued[index]).result() for index in (1, 3)] == ["queued-1", "queued-3"]
    assert not started.running() and started.done() and not started.cancelled()
    assert sorted(os.listdir(ran)) == ["queued-1", "queued-3"]
    # The cancelled task run, submitted again, is a new Dask task under the same
    # key: the cancellation the workers remember does not apply to it.
    again = runner.submit(queued[0].task_run, dask_payloads.record_run, {"directory": str(ran), "name": "queued-0"})
    assert runner.wait(again).result() == "queued-0"


@pytest.mark.timeout(240)
def test_running_goes_from_false_to_true_to_false(tmp_path):
    release = tmp_path / "release"
    with threads_runner().start() as runner:
        with taskrunners.sync.ConcurrentTaskRunner().start() as other:
            gate = other.submit(
                TaskRun(), payloads.run_once_gate_opens, {"marker": str(tmp_path / "gate"), "gate": str(release)}
            )
            # Waits for a call of another runner: not handed to Dask yet.
            future = runner.submit(
                TaskRun(),
                payloads.run_once_gate_opens,
                {"marker": str(tmp_path / "started"), "gate": str(tmp_path / "finish"), "value": gate},
            )
            assert not call_of(future).running()
            release.touch()
            wait_for_path(tmp_path / "started")
            assert call_of(future).running()
            (tmp_path / "finish").touch()
            assert runner.wait(future).is_completed()
            assert not call_of(future).running()


@pytest.mark.timeout(240)
def test_the_same_task_run_submitted_again_shares_its_running_task_and_is_not_cancelled(busy_processes_runner):
    runner, long_runs, release = busy_processes_runner
    again = runner.submit(long_runs[1].task_run, payloads.run_once_gate_opens, {"marker": "-", "gate": "-"})
    assert call_of(again).running()
    assert call_of(again).cancel() is False
    release.touch()
    assert runner.wait(again).result() == runner.wait(long_runs[1]).result() == 1


@pytest.mark.timeout(240)
def test_cancel_unstarted_cancels_what_no_worker_started_in_one_round_trip(busy_processes_runner, tmp_path):
    runner, long_runs, release = busy_processes_runner
    ran = tmp_path / "ran"
    ran.mkdir()
    client = runner._client
    queued = [submit_recorded(runner, ran, f"queued-{index}") for index in range(4)]
    with taskrunners.sync.ConcurrentTaskRunner().start() as other:
        foreign = other.submit(
            TaskRun(), payloads.run_once_gate_opens, {"marker": str(tmp_path / "foreign"), "gate": str(release)}
        )
        after_foreign = runner.submit(
            TaskRun(name="after-foreign"), payloads.add_upstream, {"upstream": foreign, "y": 1}
        )
        asked = []
        real_run = client.run

        def counting_run(function, *args, **kwargs):  # a pass-through spy
            asked.append(function.__name__)
            return real_run(function, *args, **kwargs)

        client.run = counting_run
        try:
            runner._cancel_unstarted([call_of(future) for future in [*long_runs, *queued[:3], after_foreign]])
        finally:
            del client.run
        assert asked.count("cancel_unstarted_calls") == 1
        assert not any(call_of(future).cancelled() for future in long_runs)
        for future in [*queued[:3], after_foreign]:
            assert_cancelled(runner, future)
        release.touch()
        assert [runner.wait(future).result() for future in long_runs] == [0, 1]
        assert runner.wait(queued[3]).result() == "queued-3"
        assert other.wait(foreign).is_completed()
    assert sorted(os.listdir(ran)) == ["queued-3"]


@pytest.mark.timeout(240)
def test_cancel_on_the_client_loop_thread_does_not_block_it(tmp_path):
    release = tmp_path / "release"
    runner = threads_runner()
    with runner.start(), taskrunners.sync.ConcurrentTaskRunner().start() as other:
        occupy_every_worker(runner, tmp_path, release)
        queued = runner.submit(TaskRun(), payloads.return_value, {"value": "queued"})
        foreign = other.submit(TaskRun(), payloads.run_once_gate_opens, {"marker": os.devnull, "gate": str(release)})
        after_foreign = runner.submit(TaskRun(), payloads.add_upstream, {"upstream": foreign, "y": 1})
        answers = []
        runner._client.loop.add_callback(
            lambda: answers.append((call_of(queued).cancel(), call_of(queued).running(), call_of(after_foreign).cancel()))
        )
        wait_until(lambda: answers, 60, "the client's event loop did not run the callback")
        # There the workers cannot be asked: only a call not handed to Dask is cancelled.
        assert answers == [(False, False, True)]
        release.touch()
        assert runner.wait(queued).result() == "queued"
        assert_cancelled(runner, after_foreign)


# -- killed workers, exits with an exception ---------------------------------------------------


@pytest.fixture
def few_allowed_failures():
    """Own clusters give up on a call after its workers died twice (as the external one)."""
    with dask.config.set({"distributed.scheduler.allowed-failures": EXTERNAL_ALLOWED_FAILURES}):
        yield


@pytest.mark.timeout(240)
@parametrize_kinds([PROCESSES, EXTERNAL])
def test_a_killed_worker_crashes_only_its_call(kind, request, tmp_path, few_allowed_failures):
    runner = kind.make(request, blocking=True)
    with runner.start():
        # Killed once: Dask runs the call again on another worker.
        once = runner.submit(TaskRun(), dask_payloads.die_once, {"marker": str(tmp_path / "died")})
        assert runner.wait(once).result() == "survived"
        # Killed on every attempt: that call is Crashed, naming the cause.
        doomed = runner.submit(TaskRun(), dask_payloads.die, {})
        downstream = runner.submit(TaskRun(), payloads.receive_states, {"states": doomed})
        state = runner.wait(doomed)
        assert state.is_crashed()
        assert "worker running this call died" in state.message
        assert type(state.result(raise_on_failure=False)).__name__ == "KilledWorker"
        received = runner.wait(downstream).result()
        assert received.is_crashed() and received.message == state.message
        # The runner keeps working.
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": "ok"})).result() == "ok"
        runner._client.wait_for_workers(2, timeout=120)


@pytest.mark.timeout(120)
def test_leaving_with_an_exception_cancels_and_stops_an_own_process_cluster_promptly():
    runner = SyncDask(cluster_kwargs=dict(PROCESSES_CLUSTER))
    with pytest.raises(KeyError):
        with runner.start():
            client, cluster = runner._client, runner._cluster
            workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
            assert len(workers) == 2
            futures = [runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 60}) for _ in range(4)]
            wait_until(
                lambda: sum(len(v) for v in client.processing().values()) >= 2,
                60,
                "the workers did not take two calls",
                interval=0.1,
            )
            raise KeyError("stop")
    assert client.status == "closed"
    assert cluster.status == distributed.core.Status.closed
    assert_all_ended(workers, 30, "worker processes left after the block")
    states = [runner.wait(future, timeout=0) for future in futures]
    assert [(state.type, state.message) for state in states] == [(StateType.CRASHED, CANCELLED)] * 4
    assert runner._client is None and not runner.is_started


def environment_of_this_process(names):
    return Completed(data={name: os.environ.get(name) for name in names})


def test_the_variables_dask_sets_for_its_workers_stay_out_of_this_process(monkeypatch):
    """A Nanny sets distributed.nanny.pre-spawn-environ (MALLOC_TRIM_THRESHOLD_, the
    thread counts) and PYTHONHASHSEED in the process that spawns its worker; left there,
    every process started later (loky's, Ray's) would inherit them."""
    names = sorted({*dask.config.get("distributed.nanny.pre-spawn-environ"), "PYTHONHASHSEED"})
    assert "MALLOC_TRIM_THRESHOLD_" in names
    for name in names:
        monkeypatch.delenv(name, raising=False)
    unset = dict.fromkeys(names)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # one the user set: it is kept as it is
    mine = {**unset, "OMP_NUM_THREADS": "3"}
    runner = SyncDask(cluster_kwargs={"processes": True, "n_workers": 1})
    with runner.start():
        assert environment_of_this_process(names).data == mine
        future = runner.submit(TaskRun(), environment_of_this_process, {"names": names})
        in_worker = runner.wait(future, timeout=60).result()
        assert in_worker["MALLOC_TRIM_THRESHOLD_"] is not None  # the workers have them
    assert environment_of_this_process(names).data == mine
    with pytest.raises(KeyError):
        with runner.start():
            raise KeyError("stop")
    assert environment_of_this_process(names).data == mine


@pytest.mark.timeout(120)
def test_leaving_with_an_exception_cancels_calls_on_a_cluster_it_did_not_create(dask_external_cluster):
    address = dask_external_cluster.address
    runner = SyncDask(address=address)
    with pytest.raises(KeyError):
        with runner.start():
            running = [runner.submit(TaskRun(), dask_payloads.async_sleep_registered, {"seconds": 60}) for _ in range(2)]
            queued = runner.submit(TaskRun(), payloads.sleep_then_return, {"seconds": 60})
            client = runner._client
            wait_until(
                lambda: sum(client.run(dask_payloads.running_coroutines).values()) == 2,
                60,
                "the two coroutine calls did not start",
                interval=0.1,
            )
            raise KeyError("stop")
    states = [runner.wait(future, timeout=0) for future in [*running, queued]]
    assert [(state.type, state.message) for state in states] == [(StateType.CRASHED, CANCELLED)] * 3
    # The cluster is still up, its worker threads are free again.
    with distributed.Client(address, set_as_default=False, timeout=30) as observer:
        wait_until(
            lambda: sum(observer.run(dask_payloads.running_coroutines).values()) == 0,
            60,
            "coroutine calls still run on the workers",
            interval=0.1,
        )
        assert len(observer.scheduler_info(n_workers=-1)["workers"]) == 2
        wait_until(
            lambda: not any(observer.processing().values()),
            60,
            "the scheduler still has calls processing",
            interval=0.1,
        )


# -- logging --------------------------------------------------------------------------------


def records_with(caplog, message):
    return [record for record in caplog.records if record.getMessage() == message]


def warn_in_a_call(runner, logger_name, message):
    """A call on ``runner`` logs ``message`` at WARNING; its State (the worker's pid)."""
    run_kwargs = {"logger_name": logger_name, "level": logging.WARNING, "message": message}
    return runner.wait(runner.submit(TaskRun(), dask_payloads.log_at, run_kwargs))


@parametrize_kinds([THREADS, PROCESSES, EXTERNAL])
def test_records_logged_in_a_call_reach_this_process_once(kind, request, caplog):
    caplog.set_level(logging.WARNING)
    message = f"from a worker {uuid.uuid4().hex}"
    runner = kind.make(request, blocking=True)
    with runner.start():
        state = warn_in_a_call(runner, "user.module", message)
        wait_until(lambda: records_with(caplog, message), 30, f"{message!r} was not logged here")
        # Anything forwarded twice would have arrived by the time a second call has.
        warn_in_a_call(runner, "user.module", "x")
        wait_until(lambda: records_with(caplog, "x"), 30, "'x' was not logged here")
    (record,) = records_with(caplog, message)
    assert record.name == "user.module" and record.levelno == logging.WARNING
    if kind is not THREADS:
        assert state.result() != os.getpid()


def test_two_runners_on_one_cluster_forward_each_record_once(dask_external_cluster, caplog):
    caplog.set_level(logging.WARNING)
    address = dask_external_cluster.address
    first, second = SyncDask(address=address), SyncDask(address=address)
    with first.start():
        with second.start():
            message = f"nested {uuid.uuid4().hex}"
            warn_in_a_call(second, "n", message)
            wait_until(lambda: records_with(caplog, message), 30, f"{message!r} was not logged here")
        # The inner runner is gone; the outer one still forwards.
        later = f"later {uuid.uuid4().hex}"
        warn_in_a_call(first, "n", later)
        wait_until(lambda: records_with(caplog, later), 30, f"{later!r} was not logged here")
        warn_in_a_call(first, "n", "y")
        wait_until(lambda: records_with(caplog, "y"), 30, "'y' was not logged here")
    assert len(records_with(caplog, message)) == 1
    assert len(records_with(caplog, later)) == 1


@pytest.fixture
def quiet_logger():
    """The logger "user.quiet" at WARNING in this process (caplog.set_level would also
    raise the level of caplog's handler)."""
    logger = logging.getLogger("user.quiet")
    logger.setLevel(logging.WARNING)
    yield logger
    logger.setLevel(logging.NOTSET)


@parametrize_kinds([PROCESSES, EXTERNAL])
def test_worker_records_keep_name_and_level_and_this_process_levels_decide(kind, request, caplog, quiet_logger):
    caplog.set_level(logging.INFO)
    tag = uuid.uuid4().hex
    logged = [
        ("user.module", logging.INFO, f"info {tag}"),
        ("user.module", logging.WARNING, f"warning {tag}"),
        ("user.module", logging.DEBUG, f"debug {tag}"),
        ("user.quiet", logging.INFO, f"quiet {tag}"),
    ]
    runner = kind.make(request, blocking=True)
    with runner.start():
        futures = [
            runner.submit(TaskRun(), dask_payloads.log_at, {"logger_name": name, "level": level, "message": message})
            for name, level, message in logged
        ]
        pids = {runner.wait(future).result() for future in futures}
        # The records come back with the State: there by the time it is.
        (info,) = records_with(caplog, f"info {tag}")
        (warning,) = records_with(caplog, f"warning {tag}")
    assert os.getpid() not in pids
    assert (info.name, info.levelno, warning.name, warning.levelno) == (
        "user.module", logging.INFO, "user.module", logging.WARNING
    )
    assert not records_with(caplog, f"debug {tag}") and not records_with(caplog, f"quiet {tag}")


LOGGING_SCRIPT = """
import logging
import sys

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

from taskrunners import TaskRun
from taskrunners.states import Completed
from taskrunners.sync import DaskTaskRunner


def log_lines(tag):
    logging.getLogger("user.module").info("info line %s", tag)
    logging.getLogger("user.module").warning("warning line %s", tag)
    logging.getLogger("user.quiet").info("quiet line %s", tag)
    return Completed(data=tag)


if __name__ == "__main__":
    logging.getLogger("user.quiet").setLevel(logging.WARNING)
    if sys.argv[1] == "processes":
        runner = DaskTaskRunner(cluster_kwargs={"processes": True, "n_workers": 1, "threads_per_worker": 1})
    else:
        runner = DaskTaskRunner(address=sys.argv[1])
    with runner.start():
        states = [runner.wait(runner.submit(TaskRun(), log_lines, {"tag": tag})) for tag in ("first", "second")]
    print([state.result() for state in states])
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("cluster", ["processes", "external"])
def test_a_script_with_basic_config_prints_each_worker_record_once(cluster, tmp_path, request):
    # Worker processes import the script's __main__, so its basicConfig runs there too.
    script = tmp_path / "script.py"
    script.write_text(LOGGING_SCRIPT)
    target = "processes" if cluster == "processes" else request.getfixturevalue("dask_external_cluster").address
    result = run_python(script, target, cwd=tmp_path, env=python_environment(), timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['first', 'second']"
    lines = result.stderr.splitlines()
    for tag in ("first", "second"):
        assert lines.count(f"INFO user.module info line {tag}") == 1, result.stderr
        assert lines.count(f"WARNING user.module warning line {tag}") == 1, result.stderr
    assert not [line for line in lines if "quiet line" in line], result.stderr


# -- pickling ------------------------------------------------------------------------------


@parametrize_kinds([THREADS, EXTERNAL])
def test_a_runner_unpickled_on_a_worker_reconnects_and_submits(kind, request):
    runner = kind.make(request, blocking=True)
    with runner.start():
        state = runner.wait(runner.submit(TaskRun(), dask_payloads.submit_through, {"runner": runner, "value": 9}))
    assert state.result() == (9, True)


def test_a_runner_unpickled_elsewhere_refuses_to_submit_and_wait_with_guidance():
    runner = threads_runner()
    with runner.start():
        future = runner.submit(TaskRun(), payloads.return_value, {"value": 1})
        runner.wait(future)
        copy, future_copy = cloudpickle.loads(cloudpickle.dumps((runner, future)))
        assert copy._client is None and copy._cluster is None
        with pytest.raises(RuntimeError, match="cannot be used to submit work after serialization") as info:
            copy.submit(TaskRun(), payloads.return_value, {})
        assert "get_client" in str(info.value) and "Dask worker" in str(info.value)
        with pytest.raises(RuntimeError, match="cannot be used to wait for work after serialization"):
            copy.wait(future_copy)
        with pytest.raises(RuntimeError, match="after serialization"):
            future_copy.wait()
    # Not started when pickled: the copy starts like a new runner.
    fresh = pickle.loads(pickle.dumps(threads_runner()))
    with fresh.start():
        assert fresh.wait(fresh.submit(TaskRun(), payloads.return_value, {"value": 2})).result() == 2


# -- existing clusters ---------------------------------------------------------------------


def test_connecting_retries_until_the_scheduler_comes_up_and_never_shuts_it_down(tmp_path):
    port = free_port()
    started = []

    def start_later():
        time.sleep(1.5)
        started.append(start_scheduler(tmp_path, port=port))

    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        runner = SyncDask(address=f"tcp://127.0.0.1:{port}", connect_timeout=90)
        with runner.start():
            assert runner._client.scheduler.address == f"tcp://127.0.0.1:{port}"
            assert runner._cluster is None
        starter.join()
        (scheduler,) = started
        assert scheduler.poll() is None, "leaving the block must not shut the scheduler down"
        read_address(tmp_path / "scheduler.json", scheduler)
        with distributed.Client(f"tcp://127.0.0.1:{port}", set_as_default=False, timeout=30) as client:
            assert client.scheduler_info()["address"] == f"tcp://127.0.0.1:{port}"
    finally:
        starter.join()
        for scheduler in started:
            stop_processes(family(scheduler))


@pytest.mark.parametrize("runner_class", [SyncDask, taskrunners.DaskTaskRunner])
def test_an_unreachable_address_gives_up_after_connect_timeout_naming_it(runner_class):
    address = f"tcp://127.0.0.1:{free_port()}"
    runner = runner_class(address=address, connect_timeout=1.5)

    async def start():
        async with runner.start():
            pass

    with pytest.raises(RuntimeError) as info:
        if runner_class is SyncDask:
            with runner.start():
                pass
        else:
            import anyio

            anyio.run(start)
    message = str(info.value)
    assert f"Dask scheduler at {address!r}" in message and "1.5 s" in message and "connect_timeout" in message
    assert not runner.is_started


def test_the_external_cluster_listens_on_loopback_only(dask_external_cluster):
    pids = [process.pid for process in dask_external_cluster.processes()]
    found = listening_addresses(pids)
    assert found
    assert all(is_loopback(ip) for _, ip, _ in found), found


# -- the blocking twin in odd places ------------------------------------------------------------


def test_the_twin_works_from_a_thread_running_an_event_loop():
    async def main():
        with threads_runner().start() as runner:
            upstream = runner.submit(TaskRun(), payloads.async_return_value, {"value": 20})
            downstream = runner.submit(TaskRun(), payloads.add_upstream, {"upstream": upstream, "y": 1})
            await asyncio.sleep(0)
            return runner.wait(downstream).result()

    assert asyncio.run(main()) == 21


# -- batches (batch_size="auto") --------------------------------------------------------------------


BATCH_KEY = re.compile(r"^(?P<task>.+)-batch-[0-9a-f]{32}$")


def measure(runner, run_fn, run_kwargs):
    """Run one call of ``run_fn`` and wait: its task's calls are measured from now on."""
    assert runner.wait(runner.submit(TaskRun(), run_fn, run_kwargs)).is_completed()


def submit_counted(runner, directory, count, how=None, name="call"):
    """Submit ``count`` calls of ``dask_payloads.counted``; ``how`` maps an index to
    what that call does."""
    how = how or {}
    return [
        runner.submit(
            TaskRun(name=f"{name}-{index}"),
            dask_payloads.counted,
            {"directory": str(directory), "name": f"{name}-{index}", "how": how.get(index, "return")},
        )
        for index in range(count)
    ]


def assert_each_ran_once(directory, futures):
    runs = {future.task_run.name: dask_payloads.runs_of(directory, future.task_run.name) for future in futures}
    assert set(runs.values()) == {1}, {name: count for name, count in runs.items() if count != 1}


@parametrize_kinds([THREADS, PROCESSES])
def test_many_small_calls_share_a_few_batches_and_each_runs_once(kind, request, tmp_path):
    runner = kind.make(request, blocking=True)
    assert runner.batch_size == "auto"
    with runner.start():
        measure(runner, dask_payloads.counted, {"directory": str(tmp_path), "name": "first"})
        futures = submit_counted(runner, tmp_path, 600)
        keys = [runner.wait(future).result() for future in futures]
        assert runner._batches.dispatcher.gathered == 0 and runner._batches.dispatcher.out == 0
    assert_each_ran_once(tmp_path, futures)
    batched = [key for key in keys if BATCH_KEY.match(key)]
    # Calls sent alone (while a worker was free) keep their own key.
    alone = [(key, future) for key, future in zip(keys, futures) if not BATCH_KEY.match(key)]
    assert all(key == key_of(future.task_run) for key, future in alone)
    assert len(batched) >= 500 and len(set(keys)) <= 60
    assert {BATCH_KEY.match(key)["task"] for key in batched} == {"counted"}


@parametrize_kinds([THREADS])
def test_a_slow_task_is_not_batched(kind, request):
    runner = kind.make(request, blocking=True)
    with runner.start():
        measure(runner, dask_payloads.sleepy_key, {"seconds": 0.15})
        futures = [runner.submit(TaskRun(), dask_payloads.sleepy_key, {"seconds": 0.15}) for _ in range(8)]
        keys = [runner.wait(future).result() for future in futures]
    assert keys == [key_of(future.task_run) for future in futures]


def test_batch_size_one_sends_every_call_alone_at_once():
    runner = SyncDask(cluster_kwargs=dict(THREADS_CLUSTER), batch_size=1)
    with runner.start():
        assert runner._batches is None
        measure(runner, dask_payloads.current_key, {})
        futures = [runner.submit(TaskRun(), dask_payloads.current_key, {}) for _ in range(40)]
        assert all(call_of(future).dask_future is not None for future in futures)
        keys = [runner.wait(future).result() for future in futures]
    assert keys == [key_of(future.task_run) for future in futures]


@parametrize_kinds([PROCESSES])
def test_a_call_that_raises_or_crashes_in_a_batch_takes_no_other_call_with_it(kind, request, tmp_path):
    try:
        pickle.dumps(threading.Lock())
    except Exception as exc:
        unpicklable_error = exc
    how = {20: "raise", 40: "interrupt", 60: "unpicklable"}
    runner = kind.make(request, blocking=True)
    with runner.start():
        measure(runner, dask_payloads.counted, {"directory": str(tmp_path), "name": "first"})
        futures = submit_counted(runner, tmp_path, 100, how)
        # An argument that cannot be pickled fails its own call, when its batch is sent.
        locked = runner.submit(
            TaskRun(), dask_payloads.counted, {"directory": str(tmp_path), "name": threading.Lock()}
        )
        later = submit_counted(runner, tmp_path, 20, name="later")
        states = [runner.wait(future) for future in futures]
        locked_state = runner.wait(locked)
        assert all(runner.wait(future).is_completed() for future in later)
    assert_each_ran_once(tmp_path, futures + later)
    raised, interrupted, unpicklable = (states[index] for index in how)
    assert raised.is_crashed() and raised.message == "Execution was interrupted by an unexpected exception."
    assert str(raised.result(raise_on_failure=False)) == "call-20 broke"
    assert interrupted.is_crashed() and interrupted.message == "Execution was aborted by an interrupt signal."
    assert unpicklable.is_crashed() and "could not be pickled to send it back from the Dask worker" in unpicklable.message
    assert str(unpicklable.result(raise_on_failure=False)) == str(unpicklable_error)
    assert locked_state.is_crashed() and locked_state.message.startswith(
        "The call's function or arguments could not be pickled: TypeError("
    )
    for index in how:
        # Batches take a task's calls in order: a misbehaving call whose neighbours
        # share a batch was in it, and they completed all the same.
        before, after = states[index - 1], states[index + 1]
        assert before.is_completed() and after.is_completed()
    keys = [state.result() for index, state in enumerate(states) if index not in how]
    assert sum(1 for index in how if states[index - 1].result() == states[index + 1].result()) >= 2
    assert len(set(keys)) <= 30


def gate_calls(runner, directory, gate, count):
    """``count`` calls that start on the workers and end once ``gate`` exists."""
    return [
        runner.submit(
            TaskRun(name=f"gate-{index}"),
            payloads.run_once_gate_opens,
            {"marker": str(directory / f"gate-{index}"), "gate": str(gate), "value": index},
        )
        for index in range(count)
    ]


def test_waiting_for_a_gathered_call_sends_it_at_once_and_each_call_cancels_alone(tmp_path):
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    ran.mkdir()
    runner = SyncDask(cluster_kwargs=dict(THREADS_CLUSTER))
    with runner.start():
        measure(runner, dask_payloads.counted, {"directory": str(ran), "name": "first"})
        dispatcher = runner._batches.dispatcher
        assert dispatcher.limit == 4  # twice the cluster's two worker threads
        try:
            # Two run, two wait in Dask: every Dask task the dispatcher may send is out.
            gates = gate_calls(runner, tmp_path, gate, dispatcher.limit)
            futures = submit_counted(runner, ran, 30)
            assert dispatcher.gathered == 30 and all(call_of(f).dask_future is None for f in futures)
            # A gathered call is cancelled at once and never runs.
            assert call_of(futures[0]).cancel() is True
            # Waiting sends a gathered call at once (with the calls gathered before it).
            waited = futures[3]
            assert runner.wait(waited, timeout=0.01) is None
            assert call_of(waited).dask_future is not None and call_of(waited).in_batch
            batch = [f for f in futures if call_of(f).dask_future is call_of(waited).dask_future]
            assert len(batch) >= 2 and dispatcher.gathered == 30 - 1 - len(batch)
            # A call of that batch that no worker started is cancelled alone; the batch runs on.
            cancelled = next(f for f in batch if f is not waited)
            assert call_of(cancelled).cancel() is True and not call_of(cancelled).running()
        finally:
            gate.touch()
        states = {future.task_run.name: runner.wait(future) for future in futures}
        assert [runner.wait(future).result() for future in gates] == list(range(len(gates)))
        # A lone call on a free runner is sent at once, alone.
        lone = runner.submit(TaskRun(), dask_payloads.current_key, {})
        assert call_of(lone).dask_future is not None and not call_of(lone).in_batch
        assert runner.wait(lone).result() == key_of(lone.task_run)
    for future in (futures[0], cancelled):
        assert_cancelled(runner, future)
        assert dask_payloads.runs_of(ran, future.task_run.name) == 0
    others = [f for f in futures if f not in (futures[0], cancelled)]
    assert all(states[f.task_run.name].is_completed() for f in others)
    assert_each_ran_once(ran, others)


@pytest.mark.timeout(120)
def test_leaving_with_an_exception_cancels_gathered_calls(tmp_path):
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    ran.mkdir()
    runner = SyncDask(cluster_kwargs=dict(PROCESSES_CLUSTER))
    try:
        with pytest.raises(KeyError):
            with runner.start():
                measure(runner, dask_payloads.counted, {"directory": str(ran), "name": "first"})
                gates = gate_calls(runner, tmp_path, gate, runner._batches.dispatcher.limit)
                futures = submit_counted(runner, ran, 50)
                assert runner._batches.dispatcher.gathered == 50
                raise KeyError("stop")
    finally:
        gate.touch()
    states = [runner.wait(future, timeout=0) for future in [*gates[2:], *futures]]
    assert [(state.type, state.message) for state in states] == [(StateType.CRASHED, CANCELLED)] * len(states)
    assert sorted(os.listdir(ran)) == ["first"]


def test_calls_with_other_annotations_never_share_a_batch_and_a_batch_carries_them(resources_driver):
    driver = resources_driver
    runner = driver.runner
    annotations = [{"priority": 1}, {"priority": 2, "resources": {"slots": 1}}, {}]

    def submit_all():
        futures = []
        for index in range(90):
            with dask.annotate(**annotations[index % 3]):
                futures.append(runner.submit(TaskRun(), dask_payloads.key_and_annotations, {}))
        return futures

    async def submit_all_async():
        futures = []
        for index in range(90):
            with dask.annotate(**annotations[index % 3]):
                futures.append(await runner.submit(TaskRun(), dask_payloads.key_and_annotations, {}))
        return futures

    with driver.start():
        driver.wait(driver.submit(dask_payloads.key_and_annotations, {}))
        futures = submit_all() if driver.blocking else driver.portal.call(submit_all_async)
        seen = [driver.wait(future).result() for future in futures]
    batches = {}
    for index, (key, carried) in enumerate(seen):
        expected = annotations[index % 3]
        assert {name: carried.get(name) for name in expected} == expected
        assert "priority" in carried or not expected
        batches.setdefault(key, set()).add(index % 3)
    assert all(len(kinds) == 1 for kinds in batches.values())
    assert any(BATCH_KEY.match(key) for key in batches)


@pytest.mark.timeout(240)
def test_a_worker_killed_mid_batch_dask_runs_the_batch_again(tmp_path, few_allowed_failures):
    runner = SyncDask(cluster_kwargs=dict(PROCESSES_CLUSTER))
    with runner.start():
        measure(runner, dask_payloads.counted, {"directory": str(tmp_path), "name": "first"})
        # Killed once: Dask runs the whole batch again on another worker.
        once = submit_counted(runner, tmp_path, 60, {30: "die-once"}, name="once")
        states = [runner.wait(future) for future in once]
        assert all(state.is_completed() for state in states)
        assert states[30].result() == "survived"
        runs = [dask_payloads.runs_of(tmp_path, future.task_run.name) for future in once]
        # Dask's rule for a lost task: the calls of the batch that had run before the
        # death run again with it (as do calls sent alone whose State the dead worker
        # still held). The calls after it in its batch had not started: they ran once.
        assert all(1 <= count <= 2 for count in runs) and runs[30] == 2
        batch_of_30 = states[29].result()
        assert all(runs[index] == 1 for index in range(31, 60) if states[index].result() == batch_of_30)
        runner._client.wait_for_workers(2, timeout=120)
        # Killed on every attempt: every call of that batch is Crashed, naming the cause.
        doomed = submit_counted(runner, tmp_path, 60, {30: "die"}, name="doomed")
        states = [runner.wait(future) for future in doomed]
        crashed = [state for state in states if not state.is_completed()]
        assert "worker running this call's batch died" in states[30].message
        for state in crashed:
            # The batch's calls name their batch; a call sent alone (the first few go
            # alone) that ran on the workers killed with it names itself.
            assert state.is_crashed() and (
                "worker running this call's batch died" in state.message
                or "worker running this call died" in state.message
            )
            assert type(state.result(raise_on_failure=False)).__name__ == "KilledWorker"
        # The runner keeps working.
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": "ok"})).result() == "ok"


# -- recycling workers: Dask's own lifetime and memory_limit (see the README) ----------------


def test_a_worker_lifetime_in_cluster_kwargs_replaces_dask_workers():
    cluster_kwargs = {**PROCESSES_CLUSTER, "n_workers": 1, "lifetime": "2s", "lifetime_restart": True}
    pids = set()
    with SyncDask(cluster_kwargs=cluster_kwargs).start() as runner:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(runner.wait(runner.submit(TaskRun(), payloads.return_pid, {})).result())
            time.sleep(0.5)
    assert len(pids) >= 2, pids
