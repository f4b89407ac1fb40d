"""The Ray kind, and the Ray instances the tests use.

Starting Ray takes seconds and a process holds one Ray connection at a time, so the
kind's runners join a connection the session opens once (``ray_session``): a local
instance with 2 CPUs or, when ``TASKRUNNERS_TEST_RAY_HEAD`` names the address of a
head started with ``ray start --head`` (``ray_head``), that head. tests/test_ray.py
runs the standard suite against such a head in a pytest subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

import psutil
import pytest

from taskrunners import TaskConcurrencyType
from tests.support.kinds import RunnerKind
from tests.support.network import free_port
from tests.support.pickling import register_payloads
from tests.support.processes import assert_all_ended, family, stop_processes
from tests.support.waiting import holds_within

HEAD_ENV = "TASKRUNNERS_TEST_RAY_HEAD"
# A custom resource, for the tests of per-call options.
TEST_RESOURCES = {"test-slot": 2}
LOCAL_INIT_KWARGS = {"num_cpus": 2, "include_dashboard": False, "resources": TEST_RESOURCES}
RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "ray.util.client.server", "dashboard.py")


def ray_processes(root: Optional[psutil.Process] = None) -> List[psutil.Process]:
    """Ray's processes below ``root`` (this process by default)."""
    root = root or psutil.Process()
    found = []
    for child in root.children(recursive=True):
        try:
            text = child.name() + " " + " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(name in text for name in RAY_PROCESS_NAMES):
            found.append(child)
    return found


class RaySession:
    """The Ray connection of this test process, held by a runner started for the session."""

    def __init__(self, head: Optional[str]) -> None:
        self.head = head
        self._stack: Optional[contextlib.ExitStack] = None

    def shared(self) -> Optional[str]:
        """Make sure this process is connected to the shared instance; its head address, if any."""
        import ray

        from taskrunners.sync import RayTaskRunner

        if self._stack is not None and not ray.is_initialized():
            self.release()  # someone shut Ray down under us
        if self._stack is None:
            import ray.cloudpickle

            register_payloads(ray.cloudpickle)
            if self.head:
                runner = RayTaskRunner(address=self.head)
            else:
                runner = RayTaskRunner(init_kwargs=dict(LOCAL_INIT_KWARGS))
            stack = contextlib.ExitStack()
            stack.enter_context(runner.start())
            self._stack = stack
        return self.head

    def release(self) -> None:
        """End the shared connection (and the local instance), e.g. for a runner that starts its own."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[RaySession]:
    """The process's one Ray connection; tests that need Ray not initialised call release()."""
    pytest.importorskip("ray")
    session = RaySession(os.environ.get(HEAD_ENV) or None)
    yield session
    session.release()


def ensure_auth_token() -> None:
    """Make sure Ray finds a token, as a fresh machine has none until the first ``ray.init``."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    subprocess.run(
        [ray_executable(), "get-auth-token", "--generate"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


class RayHead:
    """A Ray head started with ``ray start --head --block`` on 127.0.0.1, as a child process.

    It requires token authentication, as ``ray start`` does on a machine that has a
    token. Stopped by terminating its PID (its own processes go with it), never
    ``ray stop``.
    """

    def __init__(self) -> None:
        ensure_auth_token()
        self.temp_dir = tempfile.mkdtemp(prefix="trh")  # short: Ray's socket paths are limited
        self.port = free_port()
        self.client_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client_address = f"ray://127.0.0.1:{self.client_port}"
        self.log_path = Path(self.temp_dir) / "head.log"
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        # Single-machine mode keeps the head and its servers on 127.0.0.1.
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
        # A loaded machine can take more than Ray's 30 s to start a Ray client server.
        env["RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S"] = "180"
        command = [
            ray_executable(),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            "--num-cpus=2",
            f"--resources={json.dumps(TEST_RESOURCES)}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_until_started(timeout=120)

    def _wait_until_started(self, timeout: float) -> None:
        started = holds_within(
            lambda: not self.alive() or "Ray runtime started" in self.log(), timeout, interval=0.2
        )
        if started and self.alive():
            return
        log = self.log()  # read before stop() removes the temp dir
        self.stop()
        if started:
            raise RuntimeError(f"ray start exited early:\n{log}")
        raise RuntimeError(f"ray start did not start within {timeout} s:\n{log}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processes(self) -> List[psutil.Process]:
        """The head's descendants, then its own process."""
        return family(self.process)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> List[psutil.Process]:
        """Stop the head; returns its processes, for a check that none is left."""
        descendants = self.processes()[:-1]
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        # Ray's processes exit with the head; any straggler is stopped by its PID.
        stop_processes([p for p in descendants if p.is_running()], timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return descendants


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A Ray head on 127.0.0.1 with 2 CPUs, for the tests of one module."""
    pytest.importorskip("ray")
    head = RayHead()
    try:
        yield head
    finally:
        assert_all_ended(head.stop(), what="Ray head processes left running")


def _kind_kwargs(request: pytest.FixtureRequest) -> dict:
    head = request.getfixturevalue("ray_session").shared()
    return {"address": head} if head else {}


def _one_call_per_task_kwargs(request: pytest.FixtureRequest) -> dict:
    return {**_kind_kwargs(request), "batch_size": 1}


_HEAD = os.environ.get(HEAD_ENV)
_ID = "ray-head" if _HEAD else "ray"

KINDS = [
    # The default, batch_size="auto". First: tests that take one kind per backend take it.
    RunnerKind(
        _ID,
        "RayTaskRunner",
        TaskConcurrencyType.PARALLEL,
        kwargs=_kind_kwargs,
        pickles_results=True,
        marks=(pytest.mark.ray,),
    ),
    RunnerKind(
        f"{_ID}-batch1",  # every call a Ray task of its own
        "RayTaskRunner",
        TaskConcurrencyType.PARALLEL,
        kwargs=_one_call_per_task_kwargs,
        pickles_results=True,
        marks=(pytest.mark.ray,),
        twin_only=True,
    ),
]

