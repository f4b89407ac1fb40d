"""Timeouts: how soon a stuck call's State comes after its limit, whether its work
stopped, and what a limit costs a call that keeps it.

For each runner (its blocking twin, 2 workers):

- **stopping**: three calls that never end by themselves, each with a 1 s limit: a
  ``time.sleep``, a busy Python loop and a read from a socket that never answers.
  Each call notes when it started (the clock starts there); the figure is the
  seconds from start + limit to the moment ``wait`` returns its TimedOut State.
  Whether the work stopped: the busy loop's counter stops moving; the sleeping
  call never reaches the line after its sleep; the reading call's process is gone
  (Parallel, Ray) or, elsewhere, its thread is left blocked (reported as such).
- **overhead**: ``calls`` no-op calls submitted then waited for, with
  ``timeout_seconds=60`` and without, alternating, best of ``repeats`` each: the
  ratio of the two (1.00: a limit costs nothing).

Run with ``python -m benchmarks.timeouts [--runners ...] [--calls N] [--repeats N]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import cloudpickle

__all__ = ["main", "RUNNERS"]

LIMIT = 1.0
RUNNERS = ("sequential", "concurrent", "parallel", "dask", "ray")
KINDS = ("sleeping", "busy", "reading")


# -- the calls (they travel by value) ------------------------------------------------


def _bump(counter: str) -> None:
    with open(counter, "ab") as file:
        file.write(b".")


def _started(counter: str) -> None:
    with open(counter + ".start", "w") as file:
        file.write(f"{time.time()} {os.getpid()}")
    _bump(counter)


def sleeping(counter: str) -> Any:
    from taskrunners.states import Completed

    _started(counter)
    time.sleep(4.0)
    _bump(counter)
    return Completed(data=None)


def busy(counter: str) -> Any:
    from taskrunners.states import Completed

    _started(counter)
    next_bump = time.monotonic() + 0.05
    while True:
        if time.monotonic() >= next_bump:
            _bump(counter)
            next_bump += 0.05
    return Completed(data=None)  # never reached


def reading(counter: str, port: int) -> Any:
    from taskrunners.states import Completed

    _started(counter)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.recv(1)
    _bump(counter)
    return Completed(data=None)


def noop() -> Any:
    from taskrunners.states import Completed

    return Completed(data=None)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- runners ---------------------------------------------------------------------------


def make_runner(name: str) -> Any:
    import taskrunners.sync as sync

    if name == "sequential":
        return sync.SequentialTaskRunner()
    if name == "concurrent":
        return sync.ConcurrentTaskRunner(max_workers=2)
    if name == "parallel":
        return sync.ParallelTaskRunner(max_workers=2)
    if name == "dask":
        return sync.DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    if name == "ray":
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        return sync.RayTaskRunner(init_kwargs={"num_cpus": 2})
    raise ValueError(f"unknown runner {name!r}; choose from {', '.join(RUNNERS)}")


@contextlib.contextmanager
def _silent_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reading_here() -> bool:
    """Whether a thread of this process is still inside :func:`reading`."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code is reading.__code__:
                return True
            frame = frame.f_back  # type: ignore[assignment]
    return False


def measure_stopping(runner: Any, name: str) -> Dict[str, Dict[str, Any]]:
    """Per stuck kind: seconds from the limit to the State, and whether the work stopped."""
    from taskrunners import TaskRun

    found: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder, _silent_port() as port:
        for kind in KINDS:
            counter = os.path.join(folder, kind)
            run_fn: Callable[..., Any] = {"sleeping": sleeping, "busy": busy, "reading": reading}[kind]
            kwargs: Dict[str, Any] = {"counter": counter}
            if kind == "reading":
                kwargs["port"] = port
            future = runner.submit(TaskRun(name=kind), run_fn, kwargs, timeout_seconds=LIMIT)
            state = runner.wait(future, 60)
            seen = time.time()
            started, pid = open(counter + ".start").read().split()
            after_limit = seen - (float(started) + LIMIT)
            if kind == "busy":
                before = os.path.getsize(counter)
                time.sleep(0.5)
                stopped: Any = os.path.getsize(counter) <= before + 1
            elif kind == "sleeping":
                time.sleep(max(0.0, float(started) + 4.5 - time.time()))
                stopped = os.path.getsize(counter) == 1
            elif int(pid) == os.getpid():  # a thread of this process: is it still reading?
                time.sleep(0.5)
                stopped = "left blocked (its thread)" if _reading_here() else True
            else:
                time.sleep(0.5)
                stopped = "process ended" if not _alive(int(pid)) else "left blocked"
            if int(pid) != os.getpid() and not _alive(int(pid)):
                stopped = f"{stopped} (process ended)" if stopped is True else stopped
            found[kind] = {
                "state": state.name if state is not None else None,
                "seconds_after_limit": round(after_limit, 3),
                "stopped": stopped,
            }
            print(f"  {name:<11} {kind:<9} {found[kind]['state']}: {after_limit:6.3f} s after the limit, stopped: {stopped}", flush=True)
    return found


def _calls(runner: Any, count: int, timeout: Optional[float]) -> float:
    from taskrunners import TaskRun

    begun = time.perf_counter()
    if timeout is None:
        futures = [runner.submit(TaskRun(), noop, {}) for _ in range(count)]
    else:
        futures = [runner.submit(TaskRun(), noop, {}, timeout_seconds=timeout) for _ in range(count)]
    for future in futures:
        runner.wait(future)
    return time.perf_counter() - begun


def measure_overhead(runner: Any, count: int, repeats: int) -> Dict[str, float]:
    """Best seconds for ``count`` no-op calls without and with a limit, and their ratio."""
    _calls(runner, min(count, 1000), None)  # warm up: workers started, code loaded
    _calls(runner, min(count, 1000), 60.0)
    without: List[float] = []
    with_limit: List[float] = []
    for _ in range(repeats):
        without.append(_calls(runner, count, None))
        with_limit.append(_calls(runner, count, 60.0))
    best_without, best_with = min(without), min(with_limit)
    return {
        "us_per_call_without": round(best_without / count * 1e6, 2),
        "us_per_call_with": round(best_with / count * 1e6, 2),
        "ratio": round(best_with / best_without, 3),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.timeouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument("--calls", type=int, default=10_000, help="no-op calls per overhead run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    results: Dict[str, Any] = {"limit_seconds": LIMIT, "calls": args.calls, "runners": {}}
    for name in args.runners:
        print(f"{name}:", flush=True)
        runner = make_runner(name)
        with runner.start():
            overhead = measure_overhead(runner, args.calls, args.repeats)
            print(
                f"  {name:<11} {args.calls} no-op calls: {overhead['us_per_call_without']} us/call "
                f"without a limit, {overhead['us_per_call_with']} with: ratio {overhead['ratio']}",
                flush=True,
            )
            stopping = measure_stopping(runner, name)
        results["runners"][name] = {"overhead": overhead, "stopping": stopping}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
