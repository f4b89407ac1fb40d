"""Prefect 3's task runners as peers: the same workloads, as extra columns.

Used only when ``prefect`` is importable (``tox -e bench-peers`` installs it in its
own virtualenv); the main run never imports it. Prefect runs offline: an ephemeral
API on 127.0.0.1 with its database in a temporary ``PREFECT_HOME``, no
``PREFECT_API_URL``, no telemetry. Each peer session is one flow whose task runner is
the peer; its start-up is the time from calling the flow to its body running.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

from benchmarks.engines import BatchTimeout, EngineSettings, SyncEngine
from benchmarks.families import Family, RunnerUnavailable
from benchmarks.workloads import PLAIN_OF

__all__ = ["peer_engine", "prefect_offline"]

_home: Optional[str] = None
#: What :func:`prefect_offline` set, for the results file.
applied: Dict[str, str] = {}

#: The body each running benchmark flow runs, by the key the flow is called with.
_ACTIVE: Dict[str, tuple] = {}


def _run_session_in_flow(key: str) -> None:
    body, marks = _ACTIVE[key]
    marks["body"] = time.perf_counter()
    body()
    marks["end"] = time.perf_counter()


def prefect_offline() -> Dict[str, str]:
    """Point Prefect at a temporary home and its ephemeral local API; returns what was set.

    Must run before ``prefect`` is imported.
    """
    global _home
    if _home is None:
        _home = tempfile.mkdtemp(prefix="taskrunners-bench-prefect-")
        atexit.register(shutil.rmtree, _home, True)
    settings = {
        "PREFECT_HOME": _home,
        "PREFECT_PROFILES_PATH": os.path.join(_home, "profiles.toml"),
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DO_NOT_TRACK": "1",
    }
    os.environ.update(settings)
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        if os.environ.pop(name, None) is not None:
            settings[name] = "(unset)"
    applied.update(settings)
    return settings


def peer_engine(family: Family, settings: EngineSettings) -> "PrefectPeer":
    """Prefect's runner matching ``family``; :class:`RunnerUnavailable` says why not."""
    missing = family.missing_requirement()
    if missing:
        raise RunnerUnavailable(missing)
    prefect_offline()
    try:
        import prefect  # noqa: F401
    except Exception as exc:  # a broken install must not stop the run
        raise RunnerUnavailable(f"prefect cannot be imported: {exc}") from None
    return PrefectPeer(family, settings)


def _make_runner(family: Family, settings: EngineSettings) -> Any:
    if family.key == "concurrent":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    if family.key == "parallel":
        try:
            from prefect.task_runners import ProcessPoolTaskRunner
        except ImportError:
            raise RunnerUnavailable(
                "this Prefect version has no ProcessPoolTaskRunner (added in Prefect 3.4)"
            ) from None
        return ProcessPoolTaskRunner(max_workers=settings.workers)
    if family.key == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise RunnerUnavailable("prefect-dask is not installed") from None
        return DaskTaskRunner(cluster_kwargs=settings.dask_cluster_kwargs())
    if family.key == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise RunnerUnavailable("prefect-ray is not installed") from None
        # "local": a fresh instance, never a cluster found on the machine.
        return RayTaskRunner(address="local", init_kwargs=settings.ray_init_kwargs())
    raise RunnerUnavailable(f"Prefect has no runner matching {family.title}")


class PrefectPeer(SyncEngine):
    """Prefect tasks submitted inside one flow whose task runner is the peer."""

    def __init__(self, family: Family, settings: EngineSettings) -> None:
        self.family = family
        self.runner = _make_runner(family, settings)
        kind = type(self.runner)
        self.name = f"{kind.__module__.split('.')[0]}.{kind.__name__}"
        self._tasks: Dict[Callable[..., Any], Any] = {}

    def drive(
        self, body: Callable[[], None], record: Any, give_up: Callable[[str, str], None]
    ) -> None:
        """Run ``body`` (the session's opening, batches and closing) inside a flow.

        The flow's own start and end count as start-up and shut-down in ``record``;
        ``give_up(status, note)`` marks the session when the flow never starts.
        """
        from prefect import flow

        marks: Dict[str, float] = {}
        key = f"{self.family.key}-{id(body)}"
        _ACTIVE[key] = (body, marks)
        # A module-level body, found by name: Prefect ships the flow (and so its
        # function) to process, Dask and Ray workers, and a closure over the session
        # (locks, the progress bar) cannot be pickled.
        benchmark_flow = flow(
            _run_session_in_flow, name=f"taskrunners-benchmark-{self.family.key}",
            task_runner=self.runner, log_prints=False, persist_result=False,
            validate_parameters=False,
        )
        started = time.perf_counter()
        try:
            benchmark_flow(key)
        except Exception as exc:
            if "body" not in marks:
                give_up("failed", f"the Prefect flow did not start: {exc}")
                return
            raise
        finally:
            _ACTIVE.pop(key, None)
        finished = time.perf_counter()
        if "body" in marks:
            lead = marks["body"] - started
            for name in ("startup_seconds", "first_result_seconds"):
                if getattr(record, name) is not None:
                    setattr(record, name, getattr(record, name) + lead)
        if "end" in marks and record.shutdown_seconds is not None:
            record.shutdown_seconds += finished - marks["end"]

    def _task(self, run_fn: Callable[..., Any]) -> Any:
        prefect_task = self._tasks.get(run_fn)
        if prefect_task is None:
            from prefect import task

            options: Dict[str, Any] = {"persist_result": False}
            try:
                from prefect.cache_policies import NO_CACHE

                options["cache_policy"] = NO_CACHE
            except ImportError:
                pass
            plain = PLAIN_OF[run_fn]
            prefect_task = self._tasks[run_fn] = task(plain, name=plain.__name__, **options)
        return prefect_task

    def run_batch(self, fn, kwargs, calls, timeout):
        prefect_task = self._task(fn)
        futures = [prefect_task.submit(**kwargs) for _ in range(calls)]
        deadline = time.monotonic() + timeout
        results: List[Any] = []
        for future in futures:
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                raise BatchTimeout.after(calls, timeout) from None
        return results

    def check(self, results):
        # future.result() raised already for any call that did not complete.
        return None
