"""Ctrl-C on a plain sync script waiting on a runner: prompt exit, no child left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.processes import alive, stop_processes

pytestmark = pytest.mark.timeout(240)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    pytest.param("ConcurrentTaskRunner", {}, id="concurrent"),
    pytest.param("ParallelTaskRunner", {"max_workers": 2}, id="parallel"),
    pytest.param(
        "DaskTaskRunner",
        {"cluster_kwargs": {"n_workers": 2, "threads_per_worker": 1, "processes": True}},
        id="dask",
        marks=pytest.mark.dask,
    ),
    pytest.param("RayTaskRunner", {"init_kwargs": {"num_cpus": 2}}, id="ray", marks=pytest.mark.ray),
]


@pytest.mark.parametrize("runner_class, kwargs", CASES)
def test_ctrl_c_exits_promptly_and_leaves_no_child(runner_class, kwargs):
    script = subprocess.Popen(
        [sys.executable, "-m", "tests.interrupt_script", runner_class, json.dumps(kwargs)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children = []
    try:
        assert script.stdout.readline().strip() == "READY", script.stderr.read()
        children = psutil.Process(script.pid).children(recursive=True)
        script.send_signal(signal.SIGINT)
        try:
            script.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{runner_class}: the script did not exit within 10 s of Ctrl-C")
        assert script.returncode != 0
        assert "KeyboardInterrupt" in script.stderr.read()
        deadline = time.monotonic() + 10
        left = [child for child in children if alive(child)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [child for child in left if alive(child)]
        assert not left, f"{runner_class} left {[child.pid for child in left]} behind"
    finally:
        if script.poll() is None:
            stop_processes([psutil.Process(script.pid)])
        stop_processes([child for child in children if alive(child)])
