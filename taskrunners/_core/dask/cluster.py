"""The cluster side of the DaskTaskRunner: its settings, and the client and cluster of
one ``start()`` block.

- Settings: checking the kwargs given to the runner, importing a ``cluster_class``
  given by name, refusing a key of ``cluster_kwargs`` or ``client_kwargs`` that the
  cluster class (and, for a LocalCluster, the workers it passes the rest on to) or
  ``distributed.Client`` does not take.
- Network exposure: every listener of a LocalCluster the runner creates is pinned
  to 127.0.0.1 (:mod:`~taskrunners._core.dask.loopback`).
- Connecting to a scheduler that may still be starting, with retries until
  ``connect_timeout``; creating a cluster and its client; closing them again,
  at once if the block is left with an exception.
- The dashboard link to log: Dask's, or one naming the loopback address the
  dashboard really listens on.
- Log forwarding: whether workers send a call's log records back with its State
  (:attr:`Connection.capture`), and handing each batch of records that arrives to
  this process's loggers once (:class:`RecordForwarder`). Worker processes of a
  LocalCluster import the script's ``__main__`` and so inherit its logging
  configuration: their own handlers are kept from printing a call's records a
  second time on the terminal they share with this process.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import time
from typing import (
    AbstractSet,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
)

from taskrunners._core.calls import TIMEOUT_ERRORS
from taskrunners._core.dask import dask_private
from taskrunners._core.dask.loopback import ClusterKwargs, kwargs_on_loopback, qualified_name
from taskrunners._core.keywords import refuse_unknown, signature_keywords
from taskrunners._core.remote.records import emit

__all__ = [
    "checked_settings",
    "checked_kwargs",
    "check_keywords",
    "distributed_for_checks",
    "import_cluster_class",
    "Connection",
    "connect",
    "create",
    "close_connection",
    "RecordForwarder",
]

# Each connection attempt to an existing scheduler may take this long (unless
# client_kwargs["timeout"] says otherwise); attempts repeat until connect_timeout.
_CONNECT_ATTEMPT_SECONDS = 5.0
# How long a worker process may take to stop when the block is left with an exception.
_KILL_GRACE_SECONDS = 1.0


# -- settings ----------------------------------------------------------------------------


def checked_settings(
    address: Optional[str],
    cluster_class: Any,
    cluster_kwargs: Any,
    adapt_kwargs: Any,
    connect_timeout: Any,
) -> Optional[Callable[..., Any]]:
    """Refuse settings that contradict each other or have the wrong type; the cluster
    class (imported, if given by name).

    :raises ValueError: for ``address`` with cluster options, a ``cluster_class``
        name that cannot be imported, a ``connect_timeout`` that is no positive number
    :raises TypeError: for a ``cluster_class`` that is neither callable nor a name
    """
    if address and (cluster_class or cluster_kwargs or adapt_kwargs):
        raise ValueError(
            f"`address` ({address!r}) connects to a running Dask cluster, so "
            "`cluster_class`, `cluster_kwargs` and `adapt_kwargs`, which describe a "
            "cluster to create, cannot be given with it. Pass one or the other."
        )
    if (
        isinstance(connect_timeout, bool)
        or not isinstance(connect_timeout, (int, float))
        or not connect_timeout > 0
    ):
        raise ValueError(
            f"`connect_timeout` must be a positive number of seconds, got {connect_timeout!r}."
        )
    if isinstance(cluster_class, str):
        return import_cluster_class(cluster_class)
    if cluster_class is not None and not callable(cluster_class):
        raise TypeError(
            "`cluster_class` must be a class, a callable or its dotted name, got "
            f"{type(cluster_class).__name__}."
        )
    return cluster_class


def checked_kwargs(name: str, value: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A copy of the kwargs argument ``name``, refused if it is no mapping or sets
    ``asynchronous``.

    :raises TypeError: for a value that is not a dict or None
    :raises ValueError: for ``asynchronous`` in it
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a dict or None, got {type(value).__name__}.")
    if "asynchronous" in value:
        raise ValueError(
            f"`{name}` cannot set `asynchronous`: the runner decides how it talks to "
            "Dask (the blocking core uses a synchronous client, the async facade "
            f"bridges to it). Remove `asynchronous` from `{name}`."
        )
    return dict(value)


def distributed_for_checks(*given: Mapping[str, Any]) -> Any:
    """``distributed``, imported now if any of ``given`` has keys to check, and None if
    none has or it is not installed (``start()`` then says what to install)."""
    if not any(given):
        return None
    try:
        import distributed
    except ImportError:
        return None
    return distributed


def check_keywords(
    cluster_class: Any,
    cluster_kwargs: Mapping[str, Any],
    client_kwargs: Mapping[str, Any],
    distributed: Any,
) -> None:
    """Refuse a key of ``cluster_kwargs`` that ``cluster_class`` (None: LocalCluster)
    does not take, or of ``client_kwargs`` that ``distributed.Client`` does not take.

    With ``distributed`` None (not installed) only what needs no distributed is
    checked: a cluster class given as an object, which then is no LocalCluster.

    :raises TypeError: naming the argument, each unknown key and the closest valid key
    """
    if cluster_kwargs and (cluster_class is not None or distributed is not None):
        cluster_class = cluster_class or distributed.LocalCluster
        valid = _cluster_keywords(cluster_class, cluster_kwargs, distributed)
        if valid is not None:
            target = _cluster_target(cluster_class, cluster_kwargs, distributed)
            refuse_unknown("cluster_kwargs", cluster_kwargs, valid, target)
    if client_kwargs and distributed is not None:
        # Client passes its **kwargs to a LocalCluster of its own, but only when given
        # no address or cluster: the runner always gives one.
        valid, _ = signature_keywords(distributed.Client)
        refuse_unknown("client_kwargs", client_kwargs, valid, "distributed.Client")


def _is_local_cluster(cluster_class: Any, distributed: Any) -> bool:
    return (
        distributed is not None
        and isinstance(cluster_class, type)
        and issubclass(cluster_class, distributed.LocalCluster)
    )


def _cluster_keywords(
    cluster_class: Any, kwargs: Mapping[str, Any], distributed: Any
) -> Optional[AbstractSet[str]]:
    """The keys ``cluster_class`` takes; None for any key (``**kwargs`` passed on to
    what cannot be told)."""
    names, open_ended = signature_keywords(cluster_class)
    if not open_ended:
        return names
    if not _is_local_cluster(cluster_class, distributed):
        return None
    # A LocalCluster passes the keys it does not name on to each worker it creates;
    # a subclass taking **kwargs is taken to pass them on to LocalCluster.
    local_names, _ = signature_keywords(distributed.LocalCluster)
    worker_class = _worker_class(kwargs, distributed)
    if worker_class is None:
        return None
    worker_names = _worker_keywords(worker_class, distributed)
    return None if worker_names is None else names | local_names | worker_names


def _worker_class(kwargs: Mapping[str, Any], distributed: Any) -> Optional[type]:
    """The class of the workers a LocalCluster creates with ``kwargs``, as it decides;
    None if ``worker_class`` is given as something else than a class."""
    worker_class = kwargs.get("worker_class")
    if worker_class is None:
        processes = kwargs.get("processes")
        return distributed.Nanny if processes is None or processes else distributed.Worker
    return worker_class if isinstance(worker_class, type) else None


def _worker_keywords(worker_class: type, distributed: Any) -> Optional[AbstractSet[str]]:
    names, open_ended = signature_keywords(worker_class)
    if not open_ended:
        return names
    if issubclass(worker_class, distributed.Nanny):
        # A Nanny passes the keys it does not name on to the Worker it starts.
        passed_on = _worker_keywords(distributed.Worker, distributed)
    elif issubclass(worker_class, distributed.Worker):
        passed_on = dask_private.worker_server_keywords()
    else:
        return None
    return None if passed_on is None else names | passed_on


def _cluster_target(cluster_class: Any, kwargs: Mapping[str, Any], distributed: Any) -> str:
    """How an error names what did not take a key: the cluster class, and for a
    LocalCluster the workers it creates."""
    name = _public_name(cluster_class, distributed)
    if not _is_local_cluster(cluster_class, distributed):
        return name
    worker_class = _worker_class(kwargs, distributed)
    return f"{name} or the workers it creates ({_public_name(worker_class, distributed)})"


def _public_name(obj: Any, distributed: Any) -> str:
    """"distributed.LocalCluster" for what distributed exports, else the full name."""
    name = getattr(obj, "__name__", None)
    if distributed is not None and name and getattr(distributed, name, None) is obj:
        return f"distributed.{name}"
    return qualified_name(obj)


def import_cluster_class(path: str) -> Any:
    """The class a ``cluster_class`` name names ("package.module.Class" or "module:Class").

    :raises ValueError: naming it, if it cannot be imported
    """
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"`cluster_class` {path!r} could not be imported ({exc}); give the full "
            "dotted name of an installed class, e.g. 'distributed.LocalCluster', or "
            "the class itself."
        ) from exc


# -- the client and cluster of one block ------------------------------------------------------


class Connection(NamedTuple):
    """The client of one ``start()`` block, and the cluster if the runner created it."""

    client: Any
    #: None for a cluster the runner did not create (``address``): never shut down.
    cluster: Any
    #: Whether the workers run in this process (their records are logged here).
    workers_in_process: bool
    #: For workers outside this process: the lowest level of the records they send
    #: back, and whether to keep those from their own handlers; None otherwise.
    capture: Optional[Tuple[int, bool]]
    #: For a cluster the runner created: the variables its nannies set in this
    #: process, as they were before (put back again when the block ends, after
    #: workers that adaptive scaling or a restart spawned meanwhile).
    environment: Optional[Dict[str, Optional[str]]] = None


def connect(
    address: str,
    client_kwargs: Mapping[str, Any],
    connect_timeout: float,
    distributed: Any,
    logger: logging.Logger,
) -> Connection:
    """Connect to the scheduler at ``address``, trying until ``connect_timeout``.

    :raises RuntimeError: naming the address and the timeout, if it cannot be reached
    """
    import tenacity

    logger.info("Connecting to an existing Dask cluster at %s", address)
    client_kwargs = dict(client_kwargs)
    attempt_timeout = client_kwargs.pop("timeout", None)
    deadline = time.monotonic() + connect_timeout

    def attempt() -> Any:
        remaining = max(deadline - time.monotonic(), 0.5)
        timeout = attempt_timeout or min(remaining, _CONNECT_ATTEMPT_SECONDS)
        return distributed.Client(address, timeout=timeout, **client_kwargs)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(connect_timeout),
        wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
        retry=tenacity.retry_if_exception_type((OSError, *TIMEOUT_ERRORS)),
        reraise=True,
    )
    try:
        client = retrying(attempt)
    except (OSError, *TIMEOUT_ERRORS) as exc:
        raise RuntimeError(
            f"Could not connect to the Dask scheduler at {address!r} within "
            f"{connect_timeout:g} s ({exc}). Check that the scheduler is running "
            "and reachable at that address, or give it longer with `connect_timeout`."
        ) from exc
    in_process = _has_workers_in_process(client)
    return _opened(client, None, in_process, False, ClusterKwargs({}, None, True), logger)


def create(
    cluster_class: Callable[..., Any],
    cluster_kwargs: Mapping[str, Any],
    adapt_kwargs: Mapping[str, Any],
    client_kwargs: Mapping[str, Any],
    distributed: Any,
    logger: logging.Logger,
) -> Connection:
    """Create a cluster of ``cluster_class`` (on loopback, if a LocalCluster) and its client."""
    logger.info("Creating a new Dask cluster with `%s`", qualified_name(cluster_class))
    settings = kwargs_on_loopback(cluster_class, cluster_kwargs, distributed, logger)
    environment = dask_private.spawn_environment()
    try:
        cluster = cluster_class(**settings.kwargs)
        try:
            if adapt_kwargs:
                cluster.adapt(**adapt_kwargs)
            client = distributed.Client(cluster, **client_kwargs)
        except BaseException:
            cluster.close()
            raise
    finally:
        _restore_environment(environment)
    processes = None
    if isinstance(cluster, distributed.LocalCluster):
        processes = dask_private.cluster_processes(cluster)
    if processes is None:
        connection = _opened(client, cluster, _has_workers_in_process(client), False, settings, logger)
    else:  # its worker processes write to this process's terminal: hide_worker_output
        connection = _opened(client, cluster, not processes, processes, settings, logger)
    return connection._replace(environment=environment)


def _opened(
    client: Any,
    cluster: Any,
    in_process: bool,
    hide_worker_output: bool,
    settings: ClusterKwargs,
    logger: logging.Logger,
) -> Connection:
    """The connection, once its dashboard link is logged."""
    capture = None if in_process else (logging.getLogger().level, hide_worker_output)
    try:
        link = _dashboard_link(client, cluster, settings)
        if link:
            logger.info("The Dask dashboard is available at %s", link)
    except BaseException:
        close_connection(client, cluster, abort=True, logger=logger)
        raise
    return Connection(client, cluster, in_process, capture)


def _has_workers_in_process(client: Any) -> bool:
    if dask_private.scheduler_address(client).startswith("inproc://"):
        return True
    try:
        pids = client.run(os.getpid)
    except Exception:
        return False
    return os.getpid() in pids.values()


def _dashboard_link(client: Any, cluster: Any, settings: ClusterKwargs) -> Optional[str]:
    if cluster is None:
        return client.dashboard_link
    if not settings.dashboard_enabled:
        return None
    link = client.dashboard_link
    if link and settings.dashboard_host:
        # Dask builds the link from the scheduler's address, which for in-process
        # transport is this machine's IP, not the loopback the dashboard is on.
        port = dask_private.dashboard_port(cluster)
        if port is not None:
            link = dask_private.dashboard_link(settings.dashboard_host, port)
    return link


def close_connection(
    client: Any,
    cluster: Any,
    abort: bool,
    logger: logging.Logger,
    environment: Optional[Dict[str, Optional[str]]] = None,
) -> None:
    """Close ``client``, and ``cluster`` if the runner created it (else None).

    With ``abort`` (the block is left with an exception) the cluster's workers are
    stopped first, without waiting for the calls they run. ``environment`` is the
    connection's: its variables are put back as they were.
    """
    try:
        if abort and cluster is not None:
            try:
                dask_private.stop_workers_now(cluster, _KILL_GRACE_SECONDS)
            except Exception:
                logger.debug("Stopping the Dask workers early failed", exc_info=True)
        if client is not None:
            client.close()
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            if environment is not None:
                _restore_environment(environment)


def _restore_environment(saved: Dict[str, Optional[str]]) -> None:
    """Put the variables of :func:`dask_private.spawn_environment` back as they were."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        elif os.environ.get(name) != value:
            os.environ[name] = value


# -- log forwarding ----------------------------------------------------------------------------


class RecordForwarder:
    """Hands the log records that come back with calls' States to this process's loggers.

    Two calls sharing one Dask task (a task run submitted twice) each get a copy of
    its records, under one tag: each batch is emitted once.
    """

    _REMEMBERED_TAGS = 1_000

    def __init__(self) -> None:
        self._emitted: "collections.OrderedDict[str, None]" = collections.OrderedDict()

    def forward(self, records: Optional[List[logging.LogRecord]], tag: Optional[str]) -> None:
        if not records or tag in self._emitted:
            return
        if tag is not None:
            self._emitted[tag] = None
            if len(self._emitted) > self._REMEMBERED_TAGS:
                self._emitted.popitem(last=False)
        emit(records)
