"""Running a Python script in a child process, for the example and README tests."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
from typing import Optional, Sequence


def run_python(
    script: pathlib.Path,
    args: Sequence[str] = (),
    cwd: Optional[pathlib.Path] = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """Run ``script`` with this interpreter; stdout and stderr come back as text.

    The child gets a session of its own, so the workers it starts can be stopped with
    it by its process group id if it overruns ``timeout``.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Files, not pipes: a worker that outlives the script must not keep us reading.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _stop_group(process)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if returncode is None:
        raise AssertionError(
            f"{script.name} {' '.join(args)} did not finish within {timeout} s.\n"
            f"stdout:\n{stdout}\nstderr:\n{stderr}"
        )
    return subprocess.CompletedProcess(process.args, returncode, stdout, stderr)


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
