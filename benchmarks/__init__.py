"""The taskrunners benchmark harness: ``python -m benchmarks``.

Measures calls per second of every runner (Sequential, Concurrent, Parallel, Dask,
Ray) through the blocking twin and the async facade, beside the raw engine each is
built on (a plain loop, ``ThreadPoolExecutor`` or an anyio task group, loky, Dask's
``Client.submit``, Ray's ``remote()``), on four workloads (noop, cpu, sleep,
async-sleep). Prints a table, writes ``results.json`` and ``results.png``::

    python -m benchmarks                       # the full comparison
    python -m benchmarks --quick               # under a minute: proves it works
    python -m benchmarks --runners parallel,dask --workloads noop,cpu --repeats 9
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks with command-line ``argv``; returns the exit status."""
    # Imported here: worker processes import this package to find the workloads.
    from benchmarks.cli import main as run

    return run(argv)
