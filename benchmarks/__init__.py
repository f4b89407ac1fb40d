"""The taskrunners benchmark harness: ``python -m benchmarks``.

Measures calls per second of every runner (Sequential, Concurrent, Parallel, Dask,
Ray) on three kinds of workload:

- the classics (noop, cpu, sleep, async-sleep): the blocking twin and the async
  facade, with ``batch_size=1``, against the raw engine each is built on (a plain
  loop, ``ThreadPoolExecutor`` or an anyio task group, loky, Dask's
  ``Client.submit``, Ray's ``remote()``);
- ``tiny``, 10,000 no-op calls, and a sweep of calls of 0 to 100 ms of CPU work:
  ``batch_size=1`` and ``batch_size="auto"`` against the raw engine and against the
  engine's own bulk map (``joblib.Parallel``, ``dask.bag``, Ray's ``Pool.map``);
  ``tiny`` also through ``RunnerExecutor.map``.

``python -m benchmarks.scale`` times 10^4 to 10^6 no-op calls, with the memory each
call adds, through the twin, ``task.map``, ``RunnerExecutor.map`` and joblib;
``python -m benchmarks.goals`` prints the numbers the issues set goals for.

All engines of one runner are open at once and take turns, one batch each per round,
so load from other processes hits them alike. Prints the tables, writes
``results.json``, ``results.png`` (runner overhead) and ``crossover.png`` (which
runner for which call size)::

    python -m benchmarks                       # the full comparison
    python -m benchmarks --quick               # about a minute: proves it works
    python -m benchmarks --runners parallel,dask --workloads tiny,sweep --repeats 3
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks with command-line ``argv``; returns the exit status."""
    # Imported here: worker processes import this package to find the workloads.
    from benchmarks.cli import main as run

    return run(argv)
