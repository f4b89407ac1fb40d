"""Ctrl-C on a script waiting on a runner: it stops at once and leaves no child behind.

Each case runs ``tests/support/interrupt_script.py`` in a subprocess and sends it a real
SIGINT once its calls are running: to the script alone, on every runner and in every
mode (blocking twin, facade on asyncio and trio, sync and async flow), and to the
script's whole process group, as a terminal's Ctrl-C does (workers included), twenty
times per runner under a CPU load, where a call finishing at the same moment as the
interrupt once made the wait return instead of re-raising.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List

import psutil
import pytest

from tests.support import ROOT
from tests.support.processes import alive, assert_all_ended, stop_processes
from tests.support.waiting import holds_within

pytestmark = pytest.mark.timeout(900)

RUNNERS = [
    pytest.param("SequentialTaskRunner", {}, id="sequential"),
    pytest.param("ConcurrentTaskRunner", {}, id="concurrent"),
    pytest.param("ParallelTaskRunner", {"max_workers": 2}, id="parallel"),
    pytest.param(
        "DaskTaskRunner",
        {"cluster_kwargs": {"n_workers": 2, "threads_per_worker": 1, "processes": True}},
        id="dask",
        marks=pytest.mark.dask,
    ),
    pytest.param(
        "RayTaskRunner",
        {"init_kwargs": {"num_cpus": 2, "include_dashboard": False}},
        id="ray",
        marks=pytest.mark.ray,
    ),
]
MODES = ["twin", "asyncio", "trio", "flow", "async-flow"]
# How long a script may take to exit after Ctrl-C, and to get its first call running.
EXIT_SECONDS = 10
START_SECONDS = 180
GROUP_ROUNDS = 20


def interrupt_and_check(
    runner_class: str, kwargs: Dict[str, Any], mode: str, marker: pathlib.Path, whole_group: bool
) -> None:
    """Start the script, send SIGINT once a call runs, check a prompt exit with no child left."""
    script = subprocess.Popen(
        [
            sys.executable, "-m", "tests.support.interrupt_script",
            runner_class, json.dumps(kwargs), mode, str(marker),
        ],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A group of its own, so that signalling the group spares the test process.
        start_new_session=whole_group,
    )
    children: List[psutil.Process] = []
    try:
        first = pathlib.Path(f"{marker}-0")
        holds_within(lambda: first.exists() or script.poll() is not None, START_SECONDS, interval=0.02)
        if not first.exists():
            out, err = script.communicate(timeout=30) if script.poll() is not None else ("", "")
            pytest.fail(f"{runner_class}/{mode}: no call started (exit {script.returncode}):\n{err}")
        if whole_group:
            time.sleep(random.uniform(0, 0.3))  # land anywhere in the calls' lives
        children = psutil.Process(script.pid).children(recursive=True)
        if whole_group:
            os.killpg(script.pid, signal.SIGINT)
        else:
            script.send_signal(signal.SIGINT)
        try:
            out, err = script.communicate(timeout=EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{runner_class}/{mode}: the script did not exit within {EXIT_SECONDS} s of Ctrl-C")
        assert script.returncode != 0, out
        assert "NOT INTERRUPTED" not in out
        assert "KeyboardInterrupt" in err, err
        assert_all_ended(children, EXIT_SECONDS, f"{runner_class}/{mode} left these behind")
    finally:
        if script.poll() is None:
            stop_processes([psutil.Process(script.pid)])
        stop_processes([child for child in children if alive(child)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("runner_class, kwargs", RUNNERS)
def test_ctrl_c_stops_the_script_at_once_and_leaves_no_child(runner_class, kwargs, mode, tmp_path):
    interrupt_and_check(runner_class, kwargs, mode, tmp_path / "started", whole_group=False)


@pytest.fixture
def cpu_load() -> Iterator[None]:
    """One process spinning on a CPU for the duration of the test."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        stop_processes([psutil.Process(spinner.pid)])


@pytest.mark.soak
@pytest.mark.parametrize("runner_class, kwargs", RUNNERS)
def test_ctrl_c_to_the_process_group_is_never_swallowed(runner_class, kwargs, tmp_path, cpu_load):
    for round_ in range(GROUP_ROUNDS):
        interrupt_and_check(runner_class, kwargs, "twin", tmp_path / f"round-{round_}", whole_group=True)
