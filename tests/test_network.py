"""Network exposure: what the runners start by default listens on loopback only."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

import taskrunners.sync
from taskrunners import TaskRun
from tests import payloads

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


def listening_addresses():
    """(pid, ip, port) of every listening socket of this process and its descendants."""
    me = psutil.Process()
    found = []
    for process in [me, *me.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                found.append((process.pid, connection.laddr.ip, connection.laddr.port))
    return found


def is_loopback(ip):
    address = ipaddress.ip_address(ip)
    # A dual-stack socket bound to 127.0.0.1 is listed as ::ffff:127.0.0.1.
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.mark.parametrize("runner_class, kwargs", DEFAULT_RUNNERS)
def test_what_a_runner_starts_by_default_listens_on_loopback_only(runner_class, kwargs, request):
    if runner_class == "RayTaskRunner":
        # Otherwise it joins the session's shared Ray instance (tests/kinds_ray.py) and starts nothing.
        request.getfixturevalue("ray_session").release()
    runner = getattr(taskrunners.sync, runner_class)(**kwargs)
    before = set(listening_addresses())
    with runner.start():
        assert runner.wait(runner.submit(TaskRun(), payloads.return_value, {"value": 1})).result() == 1
        opened = [entry for entry in listening_addresses() if entry not in before]
    exposed = [entry for entry in opened if not is_loopback(entry[1])]
    assert not exposed, f"{runner_class} listens beyond loopback: {exposed}"


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
