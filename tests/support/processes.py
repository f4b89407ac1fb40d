"""Child processes of the tests: running a Python script, checking that processes
ended, and stopping them by PID (terminate first, kill after a timeout)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Mapping, Optional, Union

import psutil

from tests.support import ROOT
from tests.support.waiting import holds_within

PathLike = Union[str, os.PathLike]


def python_environment(**extra: str) -> Dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH``, and ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_python(
    *args: PathLike,
    cwd: Optional[PathLike] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 120.0,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """Run this interpreter with ``args`` (a script and its arguments, ``-c CODE`` or
    ``-m MODULE ...``) in ``cwd`` (the repository by default); stdout and stderr come
    back as text.

    The child gets a session of its own, so whatever it leaves running is stopped with
    it by its process group id. Overrunning ``timeout``, or with ``check`` a non-zero
    exit, fails with the child's output.
    """
    command = [sys.executable, *map(str, args)]
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    # Files, not pipes: a worker that outlives the child must not keep us reading.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command,
            cwd=str(cwd or ROOT),
            env=env,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            returncode: Optional[int] = process.wait(timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _stop_group(process)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    shown = " ".join(command[1:])
    if returncode is None:
        raise AssertionError(
            f"{shown} did not finish within {timeout} s.\nstdout:\n{stdout}\nstderr:\n{stderr}"
        )
    if check and returncode != 0:
        raise AssertionError(
            f"{shown} exited with {returncode}.\n"
            f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
        )
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def _stop_group(process: subprocess.Popen) -> None:
    """Stop the child and anything left in its process group: terminate, then kill."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        if sig is signal.SIGTERM:
            try:  # the child is gone; its group may still hold workers
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def family(root: Union[int, subprocess.Popen, psutil.Process]) -> List[psutil.Process]:
    """A process and its descendants, children first (so the parent cannot respawn them)."""
    pid = root if isinstance(root, int) else root.pid
    try:
        parent = psutil.Process(pid)
        return [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return []


def stop_processes(processes: List[psutil.Process], timeout: float = 10.0) -> None:
    """Terminate each process, then kill what is left after ``timeout``."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(processes, timeout=timeout)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=timeout)


def assert_all_ended(
    processes: Iterable[Union[int, psutil.Process]],
    timeout: float = 10.0,
    what: str = "processes still alive",
) -> None:
    """Wait up to ``timeout`` for these processes (or PIDs) to end; stop any that did
    not, and fail naming them."""
    watched = []
    for process in processes:
        if isinstance(process, int):
            try:
                process = psutil.Process(process)
            except psutil.NoSuchProcess:
                continue
        watched.append(process)
    holds_within(lambda: not any(alive(process) for process in watched), timeout, interval=0.05)
    left = [process for process in watched if alive(process)]
    stop_processes(left)
    assert not left, f"{what}: {left}"
