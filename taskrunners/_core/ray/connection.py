"""How a Ray runner holds Ray: starting a local instance, connecting to a cluster, or
joining the connection this process already has; and describing the cluster it finds.

- Starting versus joining. With no address, and Ray not initialised in this process,
  the runner starts a local Ray instance (``ray.init(address="local")``, so a stale
  ``/tmp/ray/ray_current_cluster`` of an old ``ray start`` is never picked up) and
  shuts it down on exit. With an address (or ``RAY_ADDRESS``) it connects and only
  disconnects on exit; when Ray is already initialised it joins that connection and
  leaves it alone.
- Token authentication (Ray 2.60 turns it on for local instances, and
  ``ray start --head`` turns it on when a token exists). Ray itself only sends its
  token to clusters it finds on its own, so connecting to an explicit address of a
  token-protected head would fail after a long retry loop; the runner sends the token
  whenever one is available (a cluster without authentication ignores it).
- Loopback. On Linux, ``ray.init`` turns a loopback address into the machine's own
  address: a new local node then listens on every interface, and a head that listens
  on 127.0.0.1 only (started in single-machine mode) cannot be reached at all. In
  Ray's single-machine mode (the default on macOS and Windows; elsewhere set by
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before ray is imported) loopback stays
  loopback, so a ``ray.init`` on a loopback address runs in that mode.
- A misspelt key of ``init_kwargs`` is refused before anything starts
  (:func:`check_init_kwargs`): ``ray.init`` itself says so only once Ray is up, or
  not at all when connecting through Ray's client.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from taskrunners._core.keywords import refuse_unknown, signature_keywords
from taskrunners._core.ray import ray_private
from taskrunners._core.ray.options import NodeResources
from taskrunners._core.remote.network import is_loopback

__all__ = [
    "Connection",
    "ray_for_checks",
    "check_init_kwargs",
    "connect",
    "disconnect",
    "live_nodes",
    "describe_cluster",
]

LOOPBACK = "127.0.0.1"

# Only one Ray connection exists per process: starting runners must not race for it.
_CONNECT_LOCK = threading.Lock()


class Connection(enum.Enum):
    """How a started runner holds Ray, which decides what leaving the block does."""

    #: A local instance the runner started: shut down on exit, which stops everything.
    STARTED = "started"
    #: A cluster at an address: the runner disconnects on exit.
    CONNECTED = "connected"
    #: The connection this process already had: left as it was.
    JOINED = "joined"


def ray_for_checks(init_kwargs: Dict[str, Any]) -> Any:
    """``ray``, imported now if ``init_kwargs`` has keys to check, and None if it has
    none or ray is not installed (``start()`` then says what to install)."""
    if not init_kwargs:
        return None
    try:
        import ray
    except ImportError:
        return None
    return ray


def check_init_kwargs(ray: Any, init_kwargs: Dict[str, Any]) -> None:
    """Refuse a key of ``init_kwargs`` that ``ray.init`` does not take.

    It takes its parameters, and through ``**kwargs`` its hidden options: those its
    code names, and any name starting with "_" (Ray's mark for them).

    :raises TypeError: naming each unknown key and the closest valid key
    """
    if not init_kwargs:
        return
    names, open_ended = signature_keywords(ray.init)
    hidden = ray_private.init_hidden_keywords() if open_ended else frozenset()
    if hidden is None:
        return
    refuse_unknown(
        "init_kwargs",
        init_kwargs,
        names,
        "ray.init()",
        also_valid=lambda key: key in hidden or (isinstance(key, str) and key.startswith("_")),
    )


def connect(
    ray: Any,
    address: Optional[str],
    init_kwargs: Dict[str, Any],
    user_init_kwargs: Dict[str, Any],
    logger: logging.Logger,
) -> Tuple[Connection, Any]:
    """Start, connect to or join Ray; how, and ``ray.init``'s context (None when joining).

    :param init_kwargs: for ``ray.init``, with the runner's defaults
    :param user_init_kwargs: the ``init_kwargs`` the user gave, to warn that they are
        not applied when joining
    :raises RuntimeError: if this process is connected to a cluster other than
        ``address``, or ``address`` needs Ray's client extra
    """
    with _CONNECT_LOCK:
        if ray.is_initialized():
            _check_joined_address(ray, address)
            logger.info("Joining the Ray instance this process is already connected to")
            if user_init_kwargs:
                logger.warning(
                    "Ray is already initialised in this process: `init_kwargs` %r are not "
                    "applied.",
                    user_init_kwargs,
                )
            return Connection.JOINED, None
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address and address not in ("local",):
            logger.info(f"Connecting to an existing Ray instance at {address}")
            ray_private.enable_token_auth_if_available()
            try:
                context = _init(ray, _host_of(address), address=address, **init_kwargs)
            except ImportError as exc:
                raise RuntimeError(
                    f"Connecting to `address={address!r}` needs Ray's client extra: "
                    "pip install 'ray[client]'."
                ) from exc
            return Connection.CONNECTED, context
        logger.info("Creating a local Ray instance")
        local_kwargs = {
            "dashboard_host": LOOPBACK,
            **ray_private.node_address_kwargs(LOOPBACK),
            **init_kwargs,
        }
        # Without Ray's own keyword for it, single-machine mode still puts the node on loopback.
        host = local_kwargs.get("_node_ip_address", LOOPBACK)
        return Connection.STARTED, _init(ray, host, address="local", **local_kwargs)


def _init(ray: Any, host: Optional[str], **init_kwargs: Any) -> Any:
    if is_loopback(host):
        with ray_private.without_cluster_mode():
            return ray.init(**init_kwargs)
    return ray.init(**init_kwargs)


def disconnect(ray: Any, connection: Optional[Connection]) -> None:
    """Leave Ray as ``connection`` says: stop what the runner started, disconnect, or nothing."""
    if connection in (Connection.STARTED, Connection.CONNECTED):
        with _CONNECT_LOCK:
            ray.shutdown()


def _check_joined_address(ray: Any, address: Optional[str]) -> None:
    wanted = _port_of(address)
    if wanted is None:
        return
    try:
        current = ray.get_runtime_context().gcs_address
    except Exception:  # a Ray client connection knows no GCS address
        return
    if _port_of(current) not in (None, wanted):
        raise RuntimeError(
            f"This process is already connected to the Ray cluster at {current}, not "
            f"`address={address!r}`: call `ray.shutdown()` first, or leave "
            "`address` out to use the current connection."
        )


def live_nodes(ray: Any) -> List[NodeResources]:
    """The resources of each live node of the cluster."""
    return [
        dict(node.get("Resources") or {})
        for node in ray.nodes()
        if node.get("Alive") or node.get("alive")
    ]


def describe_cluster(ray: Any, context: Any, logger: logging.Logger) -> List[NodeResources]:
    """Log the number of live nodes and the dashboard's URL; each live node's resources."""
    capacity = live_nodes(ray)
    logger.info(f"Using Ray cluster with {len(capacity)} nodes.")
    if context is not None:
        url = getattr(context, "dashboard_url", None)
    else:
        url = ray_private.dashboard_url()
    if url:
        if "://" not in url:
            url = f"http://{url}"
        logger.info(f"The Ray UI is available at {url}")
    return capacity


def _host_of(address: str) -> Optional[str]:
    if "://" in address:
        return None
    host, _, port = address.rpartition(":")
    return host if port.isdigit() else None


def _port_of(address: Optional[str]) -> Optional[int]:
    if not address or "://" in address:
        return None
    _, _, port = address.rpartition(":")
    return int(port) if port.isdigit() else None
