"""Every private or undocumented distributed name the DaskTaskRunner uses, each behind a
small function with a fallback.

The runner relies on distributed's documented API everywhere else. Each function
here says what it reaches for and what it does when a distributed release no
longer has it; :func:`required` tells, for a running client and cluster, whether
each one still finds its name (``tests/test_dask.py`` fails naming the function
otherwise). Checked against dask/distributed 2026.8.0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
from typing import Any, Callable, Dict, FrozenSet, Optional

from taskrunners._core.keywords import signature_keywords

__all__ = [
    "dashboard_link",
    "dashboard_port",
    "interface_address",
    "scheduler_address",
    "client_event_loop",
    "call_soon_on_client_loop",
    "client_is_open",
    "cluster_processes",
    "stop_workers_now",
    "retries_requested",
    "total_threads",
    "worker_server_keywords",
    "secede_thread",
    "spawn_environment",
    "required",
]


def dashboard_link(host: str, port: int) -> str:
    """The dashboard link Dask would show for ``host:port`` (its configured template).

    Uses ``distributed.utils.format_dashboard_link``; without it, the default template.
    """
    try:
        from distributed.utils import format_dashboard_link
    except ImportError:
        return f"http://{host}:{port}/status"
    return format_dashboard_link(host, port)


def dashboard_port(cluster: Any) -> Optional[int]:
    """The port of ``cluster``'s dashboard, from ``cluster.scheduler_info["services"]``;
    None if it cannot be read (the caller then shows Dask's own link)."""
    try:
        return int(cluster.scheduler_info["services"]["dashboard"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def interface_address(interface: str) -> Optional[str]:
    """The IPv4 address of a network interface, by ``distributed.utils.get_ip_interface``.

    None if the interface has none or the function is gone: the caller then leaves
    the interface to the user, as a choice of exposure it cannot judge.
    """
    try:
        from distributed.utils import get_ip_interface

        return str(get_ip_interface(interface))
    except Exception:
        return None


def scheduler_address(client: Any) -> str:
    """The address ``client`` talks to, from its scheduler connection ``client.scheduler``;
    "" if it cannot be read (the caller then asks the workers instead)."""
    return str(getattr(getattr(client, "scheduler", None), "address", "") or "")


def client_event_loop(client: Any) -> Optional[asyncio.AbstractEventLoop]:
    """The asyncio loop running ``client``'s comms: ``client.loop.asyncio_loop``.

    None if it cannot be found: no thread then counts as the client's loop thread,
    and a call there that asks the workers blocks that loop until it times out.
    """
    loop = getattr(getattr(client, "loop", None), "asyncio_loop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def call_soon_on_client_loop(client: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``fn(*args, **kwargs)`` on ``client``'s event loop, from any thread, soon.

    Uses tornado's ``client.loop.add_callback``; without it, asyncio's
    ``call_soon_threadsafe`` on :func:`client_event_loop` (coroutines scheduled as
    tasks). Raises RuntimeError if neither exists or the loop is closed.
    """
    add_callback = getattr(getattr(client, "loop", None), "add_callback", None)
    if add_callback is not None:
        add_callback(fn, *args, **kwargs)
        return
    loop = client_event_loop(client)
    if loop is None:
        raise RuntimeError("The Dask client has no event loop to run callbacks on.")

    def run() -> None:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            asyncio.ensure_future(result)

    loop.call_soon_threadsafe(run)


def client_is_open(client: Any) -> bool:
    """Whether ``client`` can still talk to the scheduler, by its ``status`` string;
    True if it has none (the caller tries, and handles the failure)."""
    status = getattr(client, "status", None)
    return status is None or status in ("running", "connecting", "newly-created")


def cluster_processes(cluster: Any) -> Optional[bool]:
    """Whether a LocalCluster runs its workers in processes: ``cluster.processes``;
    None if it cannot be read (the caller then asks the workers for their pid)."""
    processes = getattr(cluster, "processes", None)
    return processes if isinstance(processes, bool) else None


def stop_workers_now(cluster: Any, grace: float) -> None:
    """Stop the workers of ``cluster`` without waiting for running calls.

    Closes each of ``cluster.workers`` on the cluster's loop (``cluster.sync``):
    a Nanny gives its worker process ``grace`` seconds, then kills it; an in-process
    Worker stops without waiting for its executor threads. If the cluster has no
    such handles, nothing is done here and ``cluster.close()`` stops the workers,
    once their running calls end.
    """
    import distributed

    workers = list((getattr(cluster, "workers", None) or {}).values())
    sync = getattr(cluster, "sync", None)
    if not workers or sync is None:
        return

    async def stop(worker: Any) -> None:
        if isinstance(worker, distributed.Nanny):
            await worker.close(timeout=grace)
        elif isinstance(worker, distributed.Worker):
            await worker.close(executor_wait=False, timeout=grace)

    async def stop_all() -> None:
        await asyncio.gather(*(stop(worker) for worker in workers), return_exceptions=True)

    sync(stop_all)


def retries_requested(key: str) -> bool:
    """On a worker: whether the task ``key`` running here has Dask ``retries``.

    Reads the worker's task state (``get_worker().state.tasks[key].annotations``);
    False if it cannot, so a call that raises is Crashed at once instead of retried.
    """
    try:
        import distributed

        task = distributed.get_worker().state.tasks.get(key)
    except Exception:
        return False
    return bool(task is not None and (getattr(task, "annotations", None) or {}).get("retries"))


def total_threads(client: Any) -> Optional[int]:
    """How many worker threads the cluster of ``client`` has, as last heard: the
    ``total_threads`` of ``client._scheduler_identity``, which the client refreshes in
    the background (``distributed.client.scheduler-info-interval``, 2 s by default).

    Reading it costs no round trip. None if it cannot be read (the caller then keeps
    what it knew).
    """
    identity = getattr(client, "_scheduler_identity", None)
    try:
        threads = identity.get("total_threads")  # type: ignore[union-attr]
    except AttributeError:
        return None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) else None


def worker_server_keywords() -> Optional[FrozenSet[str]]:
    """The keyword arguments a ``distributed.Worker`` passes on through its ``**kwargs``:
    those of the server it is built on, ``distributed.node.ServerNode``.

    None if that class is gone or its signature cannot be read: the caller then lets
    every key through to a Worker.
    """
    try:
        from distributed.node import ServerNode
    except ImportError:
        return None
    names, open_ended = signature_keywords(ServerNode)
    return None if open_ended else names


def _worker_task_state_readable(dask_worker: Any) -> bool:
    """Run on workers (``Client.run``): whether :func:`retries_requested` can read the
    task state."""
    from distributed.worker_state_machine import TaskState

    fields = {field.name for field in dataclasses.fields(TaskState)}
    return isinstance(dask_worker.state.tasks, dict) and "annotations" in fields


def secede_thread(worker: Any, ident: int) -> bool:
    """From another thread: have the worker thread ``ident`` leave ``worker``'s thread
    pool, as ``distributed.secede()`` does from inside a task, so that a call stuck
    there no longer takes one of the worker's threads (a new one takes its place, and
    the worker is not waited for it when it closes).

    Uses ``Worker.active_threads`` (thread id -> key), the executors' ``_threads`` set,
    ``_adjust_thread_count()`` and ``threads_lock``, and hands the worker a
    ``SecedeEvent`` on its loop; False, doing nothing, if any of these is missing.
    """
    try:
        import threading
        import time

        from distributed.threadpoolexecutor import threads_lock
        from distributed.worker_state_machine import SecedeEvent

        key = worker.active_threads.get(ident)
        thread = next((t for t in threading.enumerate() if t.ident == ident), None)
        if key is None or thread is None:
            return False
        with threads_lock:
            for executor in worker.executors.values():
                threads = getattr(executor, "_threads", None)
                if isinstance(threads, set) and thread in threads:
                    threads.discard(thread)
                    executor._adjust_thread_count()
                    break
            else:
                return False
        event = SecedeEvent(key=key, compute_duration=0.0, stimulus_id=f"taskrunners-secede-{time.time()}")
        worker.loop.add_callback(worker.handle_stimulus, event)
        return True
    except Exception:
        return False


def _secede_reachable(dask_worker: Any) -> bool:
    """Run on workers (``Client.run``): whether :func:`secede_thread` finds its names."""
    try:
        from distributed.threadpoolexecutor import threads_lock  # noqa: F401
        from distributed.worker_state_machine import SecedeEvent  # noqa: F401
    except ImportError:
        return False
    executor = dask_worker.executors.get("default")
    return (
        isinstance(dask_worker.active_threads, dict)
        and isinstance(getattr(executor, "_threads", None), set)
        and callable(getattr(executor, "_adjust_thread_count", None))
        and callable(getattr(dask_worker, "handle_stimulus", None))
    )


def spawn_environment() -> Dict[str, Optional[str]]:
    """The variables a Nanny sets in its own process's ``os.environ`` before it spawns a
    worker, with their values now (None: unset).

    A Nanny applies ``distributed.nanny.pre-spawn-environ`` (``MALLOC_TRIM_THRESHOLD_``,
    ``OMP_NUM_THREADS``, ...) and a ``PYTHONHASHSEED`` to ``os.environ`` and leaves them
    there. A LocalCluster's nannies run in the process that made it, so every process
    it starts later inherits them: with ``MALLOC_TRIM_THRESHOLD_=65536``, numpy code
    that makes large temporaries runs several times slower in loky's or Ray's workers.
    Without that config key, only ``PYTHONHASHSEED`` is kept.
    """
    import dask

    names = set(dask.config.get("distributed.nanny.pre-spawn-environ", None) or ())
    names.add("PYTHONHASHSEED")
    return {name: os.environ.get(name) for name in names}


def required(client: Any, cluster: Any) -> Dict[str, bool]:
    """For each function above, whether the installed distributed still has what it uses.

    ``client`` is connected to ``cluster``, a running LocalCluster of worker threads.
    """
    import dask
    import distributed
    import distributed.utils

    def worker_task_state() -> bool:
        try:
            return all(client.run(_worker_task_state_readable).values())
        except Exception:
            return False

    loop = getattr(client, "loop", None)
    stop_parameters = inspect.signature(distributed.Worker.close).parameters
    return {
        "dashboard_link": hasattr(distributed.utils, "format_dashboard_link"),
        "dashboard_port": dashboard_port(cluster) is not None,
        "interface_address": hasattr(distributed.utils, "get_ip_interface"),
        "scheduler_address": bool(scheduler_address(client)),
        "client_event_loop": client_event_loop(client) is not None,
        "call_soon_on_client_loop": callable(getattr(loop, "add_callback", None)),
        "client_is_open": getattr(client, "status", None) == "running",
        "cluster_processes": cluster_processes(cluster) is not None,
        "stop_workers_now": isinstance(getattr(cluster, "workers", None), dict)
        and callable(getattr(cluster, "sync", None))
        and {"executor_wait", "timeout"} <= set(stop_parameters)
        and "timeout" in inspect.signature(distributed.Nanny.close).parameters,
        "retries_requested": worker_task_state(),
        "total_threads": total_threads(client) is not None,
        "worker_server_keywords": worker_server_keywords() is not None,
        "secede_thread": _all_workers(client, _secede_reachable),
        "spawn_environment": isinstance(
            dask.config.get("distributed.nanny.pre-spawn-environ", None), dict
        ),
    }


def _all_workers(client: Any, check: Callable[[Any], bool]) -> bool:
    try:
        return all(client.run(check).values())
    except Exception:
        return False
