"""Stopping the processes a test started: by PID, terminate first, kill after a timeout."""

from __future__ import annotations

import contextlib
from typing import List

import psutil


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
