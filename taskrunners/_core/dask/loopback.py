"""Where a LocalCluster the DaskTaskRunner creates listens: on 127.0.0.1 only.

LocalCluster serves its dashboard and HTTP endpoints on every interface by default;
:func:`kwargs_on_loopback` pins every listener of a LocalCluster the runner creates
to 127.0.0.1, unless the user chose a host or interface.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple

from taskrunners._core.dask import dask_private
from taskrunners._core.keywords import signature_keywords
from taskrunners._core.remote.network import is_loopback

__all__ = ["ClusterKwargs", "kwargs_on_loopback", "qualified_name"]

_LOOPBACK = "127.0.0.1"
_ABSENT: Any = object()


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of a class or function, for messages."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class ClusterKwargs(NamedTuple):
    """What to create a cluster with, and what that means for its dashboard link."""

    kwargs: Dict[str, Any]
    #: The host to show in the dashboard link; None to show Dask's link.
    dashboard_host: Optional[str]
    #: False when the user turned the dashboard off: no link at all then.
    dashboard_enabled: bool


def _address_parts(address: Any) -> List[Tuple[str, str]]:
    """(host, port) of each address in a Dask dashboard address: "host:port", ":port",
    "port", a port number, a list of those or a comma-separated string."""
    if isinstance(address, (list, tuple)):
        return [part for item in address for part in _address_parts(item)]
    if isinstance(address, int) and not isinstance(address, bool):
        return [("", str(address))]
    parts = []
    for item in str(address).split(","):
        host, _, port = item.strip().rpartition(":")
        parts.append((host, port or "0"))
    return parts


def _on_loopback(address: Any) -> Any:
    """``address`` with each part that names only a port bound to 127.0.0.1."""
    parts = _address_parts(address)
    if all(host for host, _ in parts):
        return address
    return ",".join(f"{host or _LOOPBACK}:{port}" for host, port in parts)


def _names_a_listening_address(kwargs: Mapping[str, Any]) -> bool:
    """Whether cluster kwargs choose a host or interface other than loopback."""
    scheduler_kwargs = kwargs.get("scheduler_kwargs")
    for options in (kwargs, scheduler_kwargs if isinstance(scheduler_kwargs, Mapping) else {}):
        for name in ("host", "ip"):
            host = options.get(name)
            if host and not is_loopback(str(host)):
                return True
        interface = options.get("interface")
        if interface:
            address = dask_private.interface_address(interface)
            if address is None or not is_loopback(address):  # None: Dask will say why
                return True
    return False


def _accepted_keywords(cluster_class: Any, names: Iterable[str]) -> Set[str]:
    names = set(names)
    accepted, open_ended = signature_keywords(cluster_class)
    return names if open_ended else names & accepted


def _creates_processes(kwargs: Mapping[str, Any], distributed: Any) -> bool:
    processes = kwargs.get("processes")
    if processes is None:
        worker_class = kwargs.get("worker_class")
        return worker_class is None or (
            isinstance(worker_class, type) and issubclass(worker_class, distributed.Nanny)
        )
    return bool(processes)


def kwargs_on_loopback(
    cluster_class: Any, cluster_kwargs: Mapping[str, Any], distributed: Any, logger: logging.Logger
) -> ClusterKwargs:
    """The kwargs for the cluster: the user's, plus what keeps a LocalCluster on loopback.

    A subclass whose ``__init__`` does not accept a keyword that pins loopback is
    created without it, and ``logger`` warns.
    """
    kwargs = dict(cluster_kwargs)
    if not (isinstance(cluster_class, type) and issubclass(cluster_class, distributed.LocalCluster)):
        return ClusterKwargs(kwargs, None, True)
    scheduler_kwargs = kwargs.get("scheduler_kwargs")
    scheduler_kwargs = dict(scheduler_kwargs) if isinstance(scheduler_kwargs, Mapping) else {}
    if "dashboard_address" in scheduler_kwargs:  # it wins over the top-level one
        dashboard = scheduler_kwargs["dashboard_address"]
    else:
        dashboard = kwargs.get("dashboard_address", _ABSENT)
    enabled = dashboard is not None
    if _names_a_listening_address(kwargs):
        return ClusterKwargs(kwargs, None, enabled)
    pinned: Dict[str, Any] = {}
    # What LocalCluster leaves on every interface: the scheduler's HTTP server
    # (dashboard, health, metrics) for a dashboard address naming only a port (its
    # default is ":8787"), and, with the dashboard off, on a threads cluster; each
    # in-process worker's HTTP server unless given an address. Scheduler, worker
    # and nanny comms already listen on 127.0.0.1 (or in-process transport).
    if dashboard is None:
        on_loopback: Any = f"{_LOOPBACK}:0"
    else:
        on_loopback = _on_loopback(f"{_LOOPBACK}:8787" if dashboard is _ABSENT else dashboard)
    if on_loopback is not dashboard:
        # With the dashboard off the address goes in scheduler_kwargs, so that
        # LocalCluster still sees None and keeps the dashboard off.
        if dashboard is None or "dashboard_address" in scheduler_kwargs:
            pinned["scheduler_kwargs"] = {**scheduler_kwargs, "dashboard_address": on_loopback}
        else:
            pinned["dashboard_address"] = on_loopback
    dashboard_host = None
    if dashboard is not None and all(is_loopback(host) for host, _ in _address_parts(on_loopback)):
        dashboard_host = _LOOPBACK
    worker_dashboard = kwargs.get("worker_dashboard_address")
    if worker_dashboard is not None:
        if _on_loopback(worker_dashboard) is not worker_dashboard:
            pinned["worker_dashboard_address"] = _on_loopback(worker_dashboard)
    elif not _creates_processes(kwargs, distributed):
        pinned["worker_dashboard_address"] = f"{_LOOPBACK}:0"
    accepted = _accepted_keywords(cluster_class, pinned)
    kwargs.update((name, value) for name, value in pinned.items() if name in accepted)
    refused = sorted(set(pinned) - accepted)
    if refused:
        logger.warning(
            "`cluster_class` %s does not accept %s, so the runner cannot keep the "
            "cluster's HTTP servers (dashboard, health, metrics) on 127.0.0.1: they "
            "may listen on every network interface. Accept these keyword arguments "
            "(or **kwargs) in its __init__ and pass them on to LocalCluster, or set "
            "them there to loopback addresses such as '127.0.0.1:0'.",
            qualified_name(cluster_class),
            ", ".join(f"`{name}`" for name in refused),
        )
    return ClusterKwargs(kwargs, dashboard_host, enabled)
