"""The Dask runner kinds: temporary LocalClusters (threads, processes) and an external cluster.

The external cluster is a ``dask scheduler`` and a ``dask worker`` (two worker
processes) that this module starts once per session on 127.0.0.1 and stops by PID.

Every kind batches calls (``batch_size="auto"``, the default) but
``dask-processes-batch1``, which sends every call alone (``batch_size=1``). That path
is the same in the twin and the facade, so its kind runs the blocking twin only:
its other modes are deselected (:func:`pytest_collection_modifyitems`).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any, Dict, List, Optional

import psutil
import pytest

from taskrunners import TaskConcurrencyType
from tests.support.kinds import RunnerKind
from tests.support.processes import family, python_environment, stop_processes
from tests.support.waiting import holds_within

DASK = pytest.mark.dask

THREADS_CLUSTER = {"processes": False, "n_workers": 2, "threads_per_worker": 1}
PROCESSES_CLUSTER = {"processes": True, "n_workers": 2, "threads_per_worker": 1}
# The external scheduler gives up on a call after its workers died twice running it.
EXTERNAL_ALLOWED_FAILURES = 1

KINDS = [
    RunnerKind(
        "dask-threads",
        "DaskTaskRunner",
        TaskConcurrencyType.CONCURRENT,
        kwargs=lambda request: {"cluster_kwargs": dict(THREADS_CLUSTER)},
        marks=(DASK,),
    ),
    RunnerKind(
        "dask-processes",
        "DaskTaskRunner",
        TaskConcurrencyType.PARALLEL,
        kwargs=lambda request: {"cluster_kwargs": dict(PROCESSES_CLUSTER)},
        pickles_results=True,
        marks=(DASK,),
    ),
    RunnerKind(
        "dask-processes-batch1",
        "DaskTaskRunner",
        TaskConcurrencyType.PARALLEL,
        kwargs=lambda request: {"cluster_kwargs": dict(PROCESSES_CLUSTER), "batch_size": 1},
        pickles_results=True,
        marks=(DASK,),
        twin_only=True,
    ),
    RunnerKind(
        "dask-external",
        "DaskTaskRunner",
        TaskConcurrencyType.CONCURRENT,
        kwargs=lambda request: {"address": request.getfixturevalue("dask_external_cluster").address},
        pickles_results=True,
        marks=(DASK,),
    ),
]





def dask_command(*args: str) -> List[str]:
    """The ``dask`` command line of this interpreter's environment."""
    return [sys.executable, "-m", "dask", *args]


def start_scheduler(
    directory: pathlib.Path, port: int = 0, env: Optional[Dict[str, str]] = None
) -> subprocess.Popen:
    """Start ``dask scheduler`` on 127.0.0.1 (no dashboard), writing ``scheduler.json``."""
    log = open(directory / "scheduler.log", "wb")
    return subprocess.Popen(
        dask_command(
            "scheduler",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--no-dashboard",
            "--dashboard-address", "127.0.0.1:0",
            "--scheduler-file", str(directory / "scheduler.json"),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env or python_environment(),
        cwd=str(directory),
    )


def read_address(scheduler_file: pathlib.Path, process: subprocess.Popen, timeout: float = 60.0) -> str:
    """The address the scheduler ``process`` writes to ``scheduler_file``, once it has."""

    def address() -> Optional[str]:
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    written = holds_within(lambda: process.poll() is not None or address(), timeout, interval=0.1)
    if process.poll() is not None:
        raise RuntimeError(f"dask scheduler exited with {process.returncode}")
    if not written:
        raise RuntimeError(f"dask scheduler wrote no address to {scheduler_file} in {timeout} s")
    return address()


class ExternalCluster:
    """A scheduler and a two-process worker started by the tests."""

    def __init__(self, address: str, scheduler: subprocess.Popen, worker: subprocess.Popen) -> None:
        self.address = address
        self.scheduler = scheduler
        self.worker = worker

    def processes(self) -> List[psutil.Process]:
        return family(self.worker) + family(self.scheduler)


@pytest.fixture(scope="session")
def dask_external_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A running external Dask cluster on 127.0.0.1, shared by the whole session."""
    import distributed

    directory = tmp_path_factory.mktemp("dask-external")
    env = python_environment(
        DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=str(EXTERNAL_ALLOWED_FAILURES)
    )
    scheduler = start_scheduler(directory, env=env)
    worker: Optional[subprocess.Popen] = None
    started: List[psutil.Process] = []
    try:
        address = read_address(directory / "scheduler.json", scheduler)
        worker_log = open(directory / "worker.log", "wb")
        worker = subprocess.Popen(
            dask_command(
                "worker", address,
                "--nworkers", "2",
                "--nthreads", "1",
                "--host", "127.0.0.1",
                "--no-dashboard",
                "--dashboard-address", "127.0.0.1:0",
                "--resources", "slots=4",
                "--memory-limit", "0",
                "--death-timeout", "60",
                "--local-directory", str(directory),
            ),
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(directory),
        )
        with distributed.Client(address, set_as_default=False, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        cluster = ExternalCluster(address, scheduler, worker)
        yield cluster
        started = cluster.processes()
    finally:
        if not started:
            started = (family(worker) if worker is not None else []) + family(scheduler)
        stop_processes(started)
