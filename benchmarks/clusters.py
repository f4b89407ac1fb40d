"""The Dask cluster or Ray instance a runner's engines share, and the environment
every engine starts in."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from benchmarks.engines import EngineSettings

__all__ = ["SharedCluster", "local_cluster", "quiet_engines"]


def local_cluster(**kwargs: Any) -> Any:
    """A ``distributed.LocalCluster``, leaving this process's environment as it was.

    Its nannies set their workers' variables (``MALLOC_TRIM_THRESHOLD_``, the thread
    counts, ``PYTHONHASHSEED``) in this process and leave them: every engine started
    afterwards (loky's, joblib's, Ray's workers) would inherit them, and numpy code that
    makes large temporaries runs several times slower under that malloc setting.
    """
    import dask
    from distributed import LocalCluster

    names = {*(dask.config.get("distributed.nanny.pre-spawn-environ", None) or ()), "PYTHONHASHSEED"}
    saved = {name: os.environ.get(name) for name in names}
    try:
        return LocalCluster(**kwargs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class SharedCluster:
    """The Dask cluster or Ray instance that every engine of one runner joins.

    Its engines take turns on it, so a batch of one never competes with a cluster of
    another, and they are compared on the very same workers. The runners' start-up
    then measures joining; the cluster's own start-up is recorded apart.
    ``address`` is set while it is open: the scheduler address, or "ray".
    """

    def __init__(self, family_key: str, settings: EngineSettings) -> None:
        self.family_key = family_key
        self.settings = settings
        self.address: Optional[str] = None
        self._cluster: Any = None

    @property
    def name(self) -> str:
        if self.family_key == "dask":
            return "distributed.LocalCluster"
        return "ray.init(address='local')"

    def open(self) -> None:
        if self.family_key == "dask":
            self._cluster = local_cluster(**self.settings.dask_cluster_kwargs())
            self.address = self._cluster.scheduler_address
        else:
            import ray

            ray.init(address="local", **self.settings.ray_init_kwargs())
            self.address = "ray"

    def close(self) -> None:
        self.address = None
        if self.family_key == "dask":
            cluster, self._cluster = self._cluster, None
            if cluster is not None:
                cluster.close()
        else:
            import ray

            ray.shutdown()

    def note(self) -> str:
        what = "Dask cluster" if self.family_key == "dask" else "Ray instance"
        return f"joined the {what} shared by this runner's engines"


def quiet_engines() -> Dict[str, str]:
    """Settle the environment every engine starts in; returns what was set.

    Must run before dask, distributed or ray are imported. Ray is kept on the
    loopback interface (its servers otherwise listen on every interface), and Dask's
    and Ray's informational logging is silenced so the progress bar stays readable.
    """
    wanted = {
        # Ray picks 127.0.0.1 as the node address, so its servers bind to loopback only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "DASK_LOGGING__DISTRIBUTED": "error",
    }
    applied = {}
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    # A RAY_ADDRESS in the environment would make a "local" instance join a cluster.
    if os.environ.pop("RAY_ADDRESS", None) is not None:
        applied["RAY_ADDRESS"] = "(unset)"
    return applied
