"""Network exposure: what the runners start by default listens on loopback only."""

from __future__ import annotations

import logging

import pytest

import taskrunners.sync
from taskrunners import TaskRun
from tests.support import payloads
from tests.support.network import is_loopback, listening_addresses

pytestmark = pytest.mark.timeout(240)

DEFAULT_RUNNERS = [
    pytest.param("ConcurrentTaskRunner", {}, id="concurrent"),
    pytest.param("ParallelTaskRunner", {"max_workers": 2}, id="parallel"),
    pytest.param("DaskTaskRunner", {}, id="dask-default", marks=pytest.mark.dask),
    pytest.param(
        "DaskTaskRunner",
        {"cluster_kwargs": {"n_workers": 2, "processes": True}},
        id="dask-processes",
        marks=pytest.mark.dask,
    ),
    pytest.param("RayTaskRunner", {"init_kwargs": {"num_cpus": 2}}, id="ray-local", marks=pytest.mark.ray),
]


@pytest.mark.parametrize("runner_class, kwargs", DEFAULT_RUNNERS)
def test_what_a_runner_starts_by_default_listens_on_loopback_only(runner_class, kwargs, request):
    if runner_class == "RayTaskRunner":
        # Otherwise it joins the session's shared Ray instance (support/kinds_ray.py): nothing new.
        request.getfixturevalue("ray_session").release()
    runner = getattr(taskrunners.sync, runner_class)(**kwargs)
    before = set(listening_addresses())
    with runner.start():
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": 1})).result() == 1
        opened = [entry for entry in listening_addresses() if entry not in before]
    exposed = [entry for entry in opened if not is_loopback(entry[1])]
    assert not exposed, f"{runner_class} listens beyond loopback: {exposed}"


# Every value of each dimension at least once: processes (absent, False, True),
# dashboard_address (absent, None, ":0", ":8787", an int, "127.0.0.1:0"), n_workers
# (absent, 1, 2), plus the worker dashboard and a loopback host named by the user.
LOCAL_CLUSTERS = [
    pytest.param({"n_workers": 1}, id="defaults"),
    pytest.param({"processes": False, "dashboard_address": None, "n_workers": 1}, id="threads-dashboard-off"),
    pytest.param({"processes": True, "dashboard_address": None, "n_workers": 1}, id="processes-dashboard-off"),
    pytest.param({"dashboard_address": None, "n_workers": 1}, id="dashboard-off"),
    pytest.param({"processes": False, "dashboard_address": ":0"}, id="threads-port-only-workers-absent"),
    pytest.param({"processes": True, "dashboard_address": ":0", "n_workers": 2}, id="processes-port-only"),
    pytest.param({"dashboard_address": ":8787", "n_workers": 1}, id="port-8787-only"),
    pytest.param({"processes": False, "dashboard_address": 0, "n_workers": 2}, id="threads-int-port"),
    pytest.param({"processes": True, "dashboard_address": "127.0.0.1:0", "n_workers": 1}, id="processes-loopback"),
    pytest.param({"processes": False, "dashboard_address": "127.0.0.1:0", "n_workers": 2}, id="threads-loopback"),
    pytest.param(
        {"processes": True, "dashboard_address": ":0", "worker_dashboard_address": ":0", "n_workers": 1},
        id="processes-worker-dashboards-port-only",
    ),
    pytest.param(
        {"processes": False, "worker_dashboard_address": ":0", "n_workers": 1},
        id="threads-worker-dashboards-port-only",
    ),
    pytest.param({"processes": True, "host": "localhost", "n_workers": 1}, id="processes-loopback-host"),
]


def run_one_call_and_list_new_listeners(runner):
    before = set(listening_addresses())
    with runner.start():
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": 1})).result() == 1
        opened = [entry for entry in listening_addresses() if entry not in before]
    assert opened, "the scheduler's HTTP server at least should listen"
    return [entry for entry in opened if not is_loopback(entry[1])]


@pytest.mark.dask
@pytest.mark.parametrize("cluster_kwargs", LOCAL_CLUSTERS)
def test_every_local_cluster_the_dask_runner_creates_listens_on_loopback_only(cluster_kwargs):
    runner = taskrunners.sync.DaskTaskRunner(cluster_kwargs={"threads_per_worker": 1, **cluster_kwargs})
    exposed = run_one_call_and_list_new_listeners(runner)
    assert not exposed, f"{cluster_kwargs} listens beyond loopback: {exposed}"


def fixed_keywords_cluster_classes():
    import distributed

    class FixedKeywordsCluster(distributed.LocalCluster):
        """Takes no keyword the runner could pin loopback with; keeps itself on loopback."""

        def __init__(self, n_workers=1):
            super().__init__(
                n_workers=n_workers,
                processes=False,
                threads_per_worker=1,
                dashboard_address="127.0.0.1:0",
                worker_dashboard_address="127.0.0.1:0",
            )

    class NamedKeywordsCluster(distributed.LocalCluster):
        """Takes the scheduler's dashboard address by name, but no **kwargs."""

        def __init__(self, n_workers=1, dashboard_address=":8787"):
            super().__init__(
                n_workers=n_workers,
                processes=False,
                threads_per_worker=1,
                dashboard_address=dashboard_address,
                worker_dashboard_address="127.0.0.1:0",
            )

    return FixedKeywordsCluster, NamedKeywordsCluster


@pytest.mark.dask
def test_a_local_cluster_subclass_with_fixed_keywords_starts_and_is_warned_about(caplog):
    fixed, named = fixed_keywords_cluster_classes()
    caplog.set_level(logging.WARNING, logger="task_runner.dask")
    runner = taskrunners.sync.DaskTaskRunner(cluster_class=fixed, cluster_kwargs={"n_workers": 1})
    assert not run_one_call_and_list_new_listeners(runner)
    (warning,) = [record for record in caplog.records if record.name == "task_runner.dask"]
    message = warning.getMessage()
    assert "FixedKeywordsCluster does not accept `dashboard_address`" in message
    assert "127.0.0.1" in message and "**kwargs" in message
    caplog.clear()
    # What it accepts is passed: its dashboard, ":8787" by default, is on loopback.
    runner = taskrunners.sync.DaskTaskRunner(cluster_class=named)
    assert not run_one_call_and_list_new_listeners(runner)
    assert not [record for record in caplog.records if record.name == "task_runner.dask"]


@pytest.mark.dask
def test_dask_over_tls_with_a_temporary_certificate():
    from distributed.security import Security

    security = Security.temporary()
    runner = taskrunners.sync.DaskTaskRunner(
        cluster_kwargs={"n_workers": 1, "processes": False, "protocol": "tls", "security": security},
        client_kwargs={"security": security},
    )
    with runner.start():
        assert runner._client.scheduler.address.startswith("tls://")
        future = runner.submit(TaskRun(), payloads.return_value, {"value": "over tls"})
        assert runner.wait(future).result() == "over tls"
