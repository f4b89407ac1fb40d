"""The workloads: what each benchmarked call does, and how many calls a batch makes.

Three kinds: the classics (noop, cpu, sleep, async-sleep), measuring each runner
against its raw engine; ``tiny``, 10,000 no-op calls on every engine; and the sweep,
calls of 0 to 100 ms of pure-Python work, showing which runner suits which call size.
Every workload has a ``run_fn`` (returns a :class:`~taskrunners.states.Completed`
state, the shape runners and raw engines both run) and a ``plain_fn`` (returns the
bare value, for Prefect's tasks). All are module-level functions, so worker
processes import them by reference.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import anyio

from taskrunners.states import Completed

__all__ = [
    "Workload", "WORKLOADS", "WORKLOAD_GROUPS", "MODES_OF_KIND", "calibrate_spin",
    "run_coroutine", "call_ignoring_item",
]


def spin(iterations: int) -> int:
    """Pure-Python arithmetic that holds the GIL for the whole loop."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def noop_value() -> None:
    return None


def cpu_value(iterations: int) -> int:
    return spin(iterations)


def sleep_value(seconds: float) -> None:
    time.sleep(seconds)


async def async_sleep_value(seconds: float) -> None:
    await anyio.sleep(seconds)


async def async_noop_value() -> None:
    return None


def noop() -> Completed:
    return Completed(data=None)


def cpu(iterations: int) -> Completed:
    return Completed(data=spin(iterations))


def sleep(seconds: float) -> Completed:
    time.sleep(seconds)
    return Completed(data=None)


async def async_sleep(seconds: float) -> Completed:
    await anyio.sleep(seconds)
    return Completed(data=None)


async def async_noop() -> Completed:
    return Completed(data=None)


def run_coroutine(fn: Callable[..., Any], kwargs: Dict[str, Any]) -> Any:
    """Run a coroutine function to its value on a fresh event loop (in a worker process).

    What a raw process engine needs for an async workload, and what the runners do
    for a coroutine ``run_fn``: one event loop per call, inside the worker.
    """
    return asyncio.run(fn(**kwargs))


#: The length of one call of the ``cpu`` workload; ``spin`` is calibrated to it.
CPU_SECONDS = 0.02

#: What each kind of workload is measured on, in the order the columns are shown.
#: "raw": the engine under the runner; "twin" and "facade": the runner with
#: ``batch_size=1`` (one engine task per call); "auto": the blocking twin with
#: ``batch_size="auto"``; "map": ``RunnerExecutor(twin).map`` (chunks, no future per
#: call); "bulk": the engine's own bulk map (joblib, dask.bag, Ray's Pool); "prefect":
#: Prefect 3's matching runner.
MODES_OF_KIND = {
    "classic": ("raw", "twin", "facade", "prefect"),
    "tiny": ("raw", "twin", "auto", "map", "bulk"),
    "sweep": ("raw", "twin", "auto", "bulk"),
}


@dataclass(frozen=True)
class Workload:
    """One kind of call, and its default batch sizes.

    :param name: the name used on the command line and in results
    :param description: one line for people
    :param calls: calls per batch in a full run (before reductions for slow engines)
    :param quick_calls: calls per batch with ``--quick``
    :param seconds_per_call: how long one call works or waits, nominally
    :param is_async: whether ``run_fn`` is a coroutine function
    :param holds_gil: whether threads of one process run it one at a time
    :param kind: "classic" (each runner against its raw engine), "tiny" (a fixed
        number of no-op calls) or "sweep" (one point of the call-size sweep)
    """

    name: str
    description: str
    calls: int
    quick_calls: int
    seconds_per_call: float
    is_async: bool
    holds_gil: bool
    run_fn: Callable[..., Any]
    plain_fn: Callable[..., Any]
    kind: str = "classic"

    @property
    def modes(self) -> Tuple[str, ...]:
        """The modes this workload is measured in."""
        return MODES_OF_KIND[self.kind]

    @property
    def fixed_calls(self) -> bool:
        """Whether every engine makes exactly :attr:`calls` calls, however slow."""
        return self.kind == "tiny"

    def kwargs(self, spin_iterations: int) -> Dict[str, Any]:
        """The keyword arguments of every call, ``spin_iterations`` taking CPU_SECONDS."""
        if self.run_fn is cpu:
            return {"iterations": max(1, round(spin_iterations * self.seconds_per_call / CPU_SECONDS))}
        if self.seconds_per_call:
            return {"seconds": self.seconds_per_call}
        return {}


def _sweep_point(milliseconds: float, calls: int, quick_calls: int) -> Workload:
    label = f"{milliseconds:g}ms"
    if not milliseconds:
        return Workload(f"sweep-{label}", "sweep: a no-op call", calls, quick_calls, 0.0,
                        False, False, noop, noop_value, kind="sweep")
    return Workload(
        f"sweep-{label}", f"sweep: {milliseconds:g} ms of pure-Python arithmetic", calls,
        quick_calls, milliseconds / 1000, False, True, cpu, cpu_value, kind="sweep",
    )


#: The call lengths of the crossover sweep, in milliseconds (0: a no-op call), and the
#: most calls a batch makes at each (full run, --quick): about half a second of work
#: on two workers.
SWEEP = ((0, 10_000, 1_000), (0.1, 10_000, 1_000), (1, 1_000, 200), (10, 100, 20),
         (100, 10, 4))

WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("noop", "returns at once: the pure cost of a call", 2000, 200, 0.0,
                 False, False, noop, noop_value),
        Workload("cpu", "20 ms of pure-Python arithmetic (holds the GIL)", 200, 20, CPU_SECONDS,
                 False, True, cpu, cpu_value),
        Workload("sleep", "time.sleep(0.05) in a plain function", 200, 20, 0.05,
                 False, False, sleep, sleep_value),
        Workload("async-sleep", "await anyio.sleep(0.1) in a coroutine function", 1000, 100, 0.1,
                 True, False, async_sleep, async_sleep_value),
        Workload("tiny", "10,000 no-op calls (500 with --quick), the same count everywhere",
                 10_000, 500, 0.0, False, False, noop, noop_value, kind="tiny"),
        *(_sweep_point(*point) for point in SWEEP),
    )
}

#: Names that stand for several workloads on the command line.
WORKLOAD_GROUPS: Dict[str, Tuple[str, ...]] = {
    "classic": tuple(name for name, w in WORKLOADS.items() if w.kind == "classic"),
    "sweep": tuple(name for name, w in WORKLOADS.items() if w.kind == "sweep"),
}

#: The call that measures start-to-first-result, for engines taking plain and async calls.
FIRST_CALL = {False: noop, True: async_noop}

#: Each ``run_fn``'s plain-value twin, for Prefect's tasks.
PLAIN_OF: Dict[Callable[..., Any], Callable[..., Any]] = {
    noop: noop_value, async_noop: async_noop_value,
    **{w.run_fn: w.plain_fn for w in WORKLOADS.values()},
}


def call_ignoring_item(fn: Callable[..., Any], kwargs: Dict[str, Any], item: Any) -> Any:
    """``fn(**kwargs)``, for the bulk maps, which hand each call an item of a sequence."""
    if inspect.iscoroutinefunction(fn):
        return run_coroutine(fn, kwargs)
    return fn(**kwargs)


def calibrate_spin(target_seconds: float = 0.02) -> Tuple[int, float]:
    """How many :func:`spin` iterations take ``target_seconds`` here; and the time they took.

    Uses the fastest of several tries, the least disturbed by other processes.
    """

    def fastest(iterations: int, tries: int) -> float:
        best = float("inf")
        for _ in range(tries):
            start = time.perf_counter()
            spin(iterations)
            best = min(best, time.perf_counter() - start)
        return best

    iterations = 10_000
    while True:
        took = fastest(iterations, 3)
        if took >= target_seconds / 4:
            break
        iterations *= 2
    # On a busy machine most tries are slowed down by other processes; many short
    # tries make it likely that one ran undisturbed.
    took = min(took, fastest(iterations, 12))
    iterations = max(1, int(iterations * target_seconds / took))
    return iterations, fastest(iterations, 5)
