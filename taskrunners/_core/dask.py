"""The blocking DaskTaskRunner: calls run on a Dask cluster through a synchronous Client."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import importlib
import os
import threading
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import cloudpickle

from taskrunners._collections import iter_leaves, visit_collection
from taskrunners._core.base import _FLAT_TYPES, BlockingTaskRunner, TaskConcurrencyType
from taskrunners._core.calls import (
    TIMEOUT_ERRORS,
    checked_state,
    is_coroutine_function,
    settle,
    when_all_done,
)
from taskrunners.futures import PrefectFuture, TaskRun
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["DaskTaskRunner"]

_MISSING_DISTRIBUTED = "Using the `DaskTaskRunner` requires `distributed` to be installed."

# Each connection attempt to an existing scheduler may take this long (unless
# client_kwargs["timeout"] says otherwise); attempts repeat until connect_timeout.
_CONNECT_ATTEMPT_SECONDS = 5.0
# How long a worker process may take to stop when the block is left with an exception.
_KILL_GRACE_SECONDS = 1.0


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise RuntimeError(_MISSING_DISTRIBUTED) from exc
    return distributed


def _import_object(path: str) -> Any:
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"`cluster_class` {path!r} could not be imported ({exc}); give the full "
            "dotted name of an installed class, e.g. 'distributed.LocalCluster', or "
            "the class itself."
        ) from exc


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _copied_kwargs(name: str, value: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
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


# -- the worker side ----------------------------------------------------------------


class _Upstream:
    """Stands in a call's arguments for the State of an upstream call handed to Dask."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> Any:
        return (_Upstream, (self.index,))


class _CrashedOnWorker(Exception):
    """Raised on a worker so that Dask's ``retries`` apply to a call that crashed."""

    def __init__(self, state: State) -> None:
        super().__init__(state)
        self.state = state

    def __str__(self) -> str:
        return f"the call crashed: {self.state.message}"


# Calls of this worker process that may be cancelled while they run: coroutine calls
# by Dask key, as (loop, task). Keys cancelled are remembered (the last few thousand),
# as the cancellation may arrive just before the call starts.
_running_coroutines: Dict[str, Any] = {}
_cancelled_keys: "collections.OrderedDict[str, None]" = collections.OrderedDict()
_registry_lock = threading.Lock()
_REMEMBERED_CANCELLATIONS = 10_000


async def _await_call(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]) -> tuple:
    try:
        return checked_state(run_fn, await run_fn(**run_kwargs)), None
    except BaseException as exc:
        return exception_to_crashed_state(exc), exc


def _run_coroutine(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], key: str) -> tuple:
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(_await_call(run_fn, run_kwargs))
        with _registry_lock:
            if key in _cancelled_keys:
                task.cancel()
            _running_coroutines[key] = (loop, task)
        try:
            return loop.run_until_complete(task)
        except BaseException as exc:  # cancelled before it started
            return exception_to_crashed_state(exc), None
        finally:
            with _registry_lock:
                _running_coroutines.pop(key, None)
            loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def _cancel_calls(keys: List[str]) -> int:
    """Run on workers (``Client.run``): cancel these calls; returns how many were running.

    A coroutine call is cancelled where it awaits; a plain call not started yet will
    not start. A plain call already running cannot be stopped.
    """
    cancelled = 0
    with _registry_lock:
        for key in keys:
            _cancelled_keys[key] = None
            running = _running_coroutines.get(key)
            if running is not None:
                loop, task = running
                try:
                    loop.call_soon_threadsafe(task.cancel)
                    cancelled += 1
                except RuntimeError:  # that loop just closed
                    pass
        while len(_cancelled_keys) > _REMEMBERED_CANCELLATIONS:
            _cancelled_keys.popitem(last=False)
    return cancelled


def _retries_requested(key: str) -> bool:
    try:
        import distributed

        task = distributed.get_worker().state.tasks.get(key)
    except Exception:
        return False
    return bool(task is not None and (task.annotations or {}).get("retries"))


def _run_on_worker(payload: bytes, key: str, upstream: Optional[List[State]]) -> State:
    """What Dask runs: one call, to a State. Its value is the State itself."""
    try:
        run_fn, run_kwargs = cloudpickle.loads(payload)
        if upstream:
            run_kwargs = visit_collection(
                run_kwargs,
                lambda value: upstream[value.index] if type(value) is _Upstream else value,
            )
    except BaseException as exc:
        return Crashed(
            message=f"The call could not be loaded on the Dask worker: {exc!r}. Make "
            "sure the modules its function and arguments need are installed there.",
            data=exc,
        )
    if _cancelled_keys and key in _cancelled_keys:
        return exception_to_crashed_state(concurrent.futures.CancelledError())
    if is_coroutine_function(run_fn):
        state, raised = _run_coroutine(run_fn, run_kwargs, key)
    else:
        try:
            return checked_state(run_fn, run_fn(**run_kwargs))
        except BaseException as exc:
            state, raised = exception_to_crashed_state(exc), exc
    if isinstance(raised, Exception) and _retries_requested(key):
        raise _CrashedOnWorker(state) from raised
    return state


# -- the client side -----------------------------------------------------------------


class _DaskCall(concurrent.futures.Future):
    """One call on the cluster; its result is the call's State once fetched.

    ``dask_future`` is None until the call is submitted to Dask (it may wait for
    upstream calls of other runners first); it is replaced if the call is rerun.
    """

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.client = client
        self.dask_future: Any = None
        # Set when upstream calls were handed to Dask: what a rerun needs.
        self.rerun: Optional[tuple] = None

    def cancel(self) -> bool:
        """Cancel the call, and its Dask task (which Dask stops only if not running)."""
        if not super().cancel():
            return False
        dask_future = self.dask_future
        if dask_future is not None:
            try:
                self.client.loop.add_callback(self.client.cancel, [dask_future], asynchronous=True)
            except Exception:  # the client is closed: its tasks are released anyway
                pass
        return True


class _StateFetcher:
    """Fetches the States of finished calls in batches, on the client's event loop.

    One ``gather`` brings back every State that finished meanwhile, so a thousand
    small calls cost a few round trips, not a thousand.
    """

    def __init__(self, runner: "DaskTaskRunner", client: Any) -> None:
        self._runner = runner
        self._client = client
        self._lock = threading.Lock()
        self._to_watch: List[tuple] = []
        self._watching = False
        self._ready: List[tuple] = []
        self._fetching = False

    def watch(self, call: _DaskCall, dask_future: Any) -> None:
        # Done callbacks are registered from the client's loop, a burst at a time:
        # each registration from another thread would wake the loop up.
        with self._lock:
            self._to_watch.append((call, dask_future))
            if self._watching:
                return
            self._watching = True
        self._client.loop.add_callback(self._watch_all)

    def _watch_all(self) -> None:
        with self._lock:
            batch, self._to_watch, self._watching = self._to_watch, [], False
        for call, dask_future in batch:
            dask_future.add_done_callback(functools.partial(self._on_done, call))

    def _on_done(self, call: _DaskCall, dask_future: Any) -> None:
        with self._lock:
            self._ready.append((call, dask_future))
            if self._fetching:
                return
            self._fetching = True
        try:
            self._client.loop.add_callback(self._fetch)
        except Exception:  # the client's loop is gone: nothing can be fetched
            with self._lock:
                batch, self._ready, self._fetching = self._ready, [], False
            for call, _ in batch:
                settle(call, Crashed(message="The Dask client closed before the call's State arrived."))

    async def _fetch(self) -> None:
        while True:
            with self._lock:
                batch, self._ready = self._ready, []
                if not batch:
                    self._fetching = False
                    return
            try:
                await self._settle(batch)
            except BaseException as exc:
                for call, _ in batch:
                    settle(call, exception_to_crashed_state(exc))
                if not isinstance(exc, Exception):
                    with self._lock:
                        self._fetching = False
                    raise

    async def _settle(self, batch: List[tuple]) -> None:
        runner, client = self._runner, self._client
        gatherable = []
        for call, dask_future in batch:
            if call.done() or call.dask_future is not dask_future:
                continue  # cancelled, or replaced by a rerun
            status = dask_future.status
            if status == "error":
                exc = await dask_future.exception(asynchronous=True)
                runner._settle_failure(call, exc)
            elif status == "cancelled":
                runner._settle_failure(call, concurrent.futures.CancelledError())
            else:
                gatherable.append(call)
        if not gatherable:
            return
        try:
            states = await client.gather([c.dask_future for c in gatherable], asynchronous=True)
        except Exception:
            # One bad result (lost, unpicklable, ...) must not take the others with it.
            for call in gatherable:
                try:
                    (state,) = await client.gather([call.dask_future], asynchronous=True)
                except Exception as exc:
                    state = Crashed(
                        message="The call's State could not be fetched from the Dask "
                        f"cluster: {exc!r}. Its data must be picklable.",
                        data=exc,
                    )
                call.rerun = None
                settle(call, state)
            return
        for call, state in zip(gatherable, states):
            call.rerun = None
            settle(call, state)


# Which client of this process subscribes to forwarded worker logs, per scheduler:
# two runners on one cluster must not both re-emit every record.
_log_subscribers: Dict[str, List[Any]] = {}
_log_subscribers_lock = threading.Lock()


class DaskTaskRunner(BlockingTaskRunner):
    """Runs calls on a Dask cluster: a temporary one it creates, or one it connects to.

    By default a temporary ``distributed.LocalCluster`` is created when the runner
    starts and closed when its ``start()`` block ends. Any other cluster class can
    be named with ``cluster_class``/``cluster_kwargs``; ``address`` connects to a
    scheduler that is already running instead, and leaving the block then never
    shuts that cluster down.

    :param address: the address of a running Dask scheduler, e.g.
        ``"tcp://127.0.0.1:8786"``; None to create a temporary cluster
    :param cluster_class: the cluster class for a temporary cluster, or its full
        dotted name (imported at once); None for ``distributed.LocalCluster``
    :param cluster_kwargs: keyword arguments for ``cluster_class``
    :param adapt_kwargs: keyword arguments for ``cluster.adapt()``; adaptive
        scaling is enabled only when given
    :param client_kwargs: keyword arguments for ``distributed.Client``;
        ``set_as_default`` defaults to False
    :param connect_timeout: seconds to keep trying to reach ``address`` (with
        back-off) before giving up
    :raises ValueError: for ``address`` together with cluster options, for
        ``asynchronous`` in ``cluster_kwargs`` or ``client_kwargs``, for a
        ``cluster_class`` name that cannot be imported, or a bad ``connect_timeout``
    :raises TypeError: for kwargs that are not dicts

    A LocalCluster the runner creates listens on 127.0.0.1 only (scheduler, workers
    and dashboard) unless ``cluster_kwargs`` choose a ``host``, ``interface`` or
    dashboard address; ``cluster_kwargs`` itself is kept exactly as given.

    How calls run:

    - Each call is a Dask task with the key ``f"{task_run.name}-{task_run.id.hex}"``
      and ``pure=True``, so a task run submitted twice runs once. Upstream calls of
      this runner are handed to Dask as Dask futures: their States go from worker
      to worker without a trip through this process.
    - Function and arguments are serialized with cloudpickle, so lambdas, closures
      and modules registered for pickling by value work without being importable
      on the workers. A coroutine ``run_fn`` runs on an event loop of its own in a
      worker thread.
    - ``dask.annotate(...)`` (resources, priority, retries, workers, ...) around a
      submission applies to that call. With ``retries``, a ``run_fn`` that raises
      is retried by Dask; a returned State is never retried.
    - A worker that dies while running a call (killed, out of memory, ``os._exit``):
      Dask reruns the call on another worker, up to the scheduler's
      ``distributed.scheduler.allowed-failures`` setting (3 by default); after that
      the call's State is Crashed, naming the cause. Other calls, and calls that
      depend on the crashed one (they receive its Crashed State), go on normally.
    - Records logged inside calls on worker processes are forwarded to this
      process's loggers (``Client.forward_logging``); workers inside this process
      log here directly.
    - Leaving the block with an exception cancels the runner's calls that have not
      finished, stops the workers of a cluster the runner created at once, cancels
      coroutine calls running on other workers, and closes the client. A plain
      call already running on a cluster the runner did not create runs to its end:
      Dask cannot stop a running thread.
    - Pickled, the runner drops its client and cluster. A started runner unpickled
      inside a task on a Dask worker reconnects with ``distributed.get_client()``;
      unpickled anywhere else, it raises RuntimeError on submit and wait.

    >>> from taskrunners.sync import DaskTaskRunner
    >>> from taskrunners import TaskRun
    >>> from taskrunners.states import Completed
    >>> runner = DaskTaskRunner(cluster_kwargs={"processes": False, "n_workers": 1})
    >>> with runner.start():
    ...     future = runner.submit(TaskRun(), lambda: Completed(data=42), {})
    ...     runner.wait(future).result()
    42
    """

    _handles = ("_client", "_cluster", "_fetcher")
    _usable_after_pickling = True

    def __init__(
        self,
        address: Optional[str] = None,
        cluster_class: Union[str, Callable[..., Any], None] = None,
        cluster_kwargs: Optional[Dict[str, Any]] = None,
        adapt_kwargs: Optional[Dict[str, Any]] = None,
        client_kwargs: Optional[Dict[str, Any]] = None,
        connect_timeout: float = 30.0,
    ) -> None:
        if address and (cluster_class or cluster_kwargs or adapt_kwargs):
            raise ValueError(
                f"`address` ({address!r}) connects to a running Dask cluster, so "
                "`cluster_class`, `cluster_kwargs` and `adapt_kwargs`, which describe a "
                "cluster to create, cannot be given with it. Pass one or the other."
            )
        if isinstance(cluster_class, str):
            cluster_class = _import_object(cluster_class)
        elif cluster_class is not None and not callable(cluster_class):
            raise TypeError(
                "`cluster_class` must be a class, a callable or its dotted name, got "
                f"{type(cluster_class).__name__}."
            )
        if (
            isinstance(connect_timeout, bool)
            or not isinstance(connect_timeout, (int, float))
            or not connect_timeout > 0
        ):
            raise ValueError(
                f"`connect_timeout` must be a positive number of seconds, got {connect_timeout!r}."
            )
        cluster_kwargs = _copied_kwargs("cluster_kwargs", cluster_kwargs)
        adapt_kwargs = _copied_kwargs("adapt_kwargs", adapt_kwargs)
        client_kwargs = _copied_kwargs("client_kwargs", client_kwargs)
        client_kwargs.setdefault("set_as_default", False)

        self.address = address
        self.cluster_class = cluster_class
        self.cluster_kwargs = cluster_kwargs
        self.adapt_kwargs = adapt_kwargs
        self.client_kwargs = client_kwargs
        self.connect_timeout = float(connect_timeout)

        self._client: Any = None
        self._cluster: Any = None
        self._fetcher: Optional[_StateFetcher] = None
        self._owns_cluster = False
        self._workers_in_process = False
        self._dashboard_on_loopback = False
        # Why an unpickled runner has no client (distributed.get_client() failed).
        self._reconnect_error: Optional[str] = None
        super().__init__()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        if self.cluster_kwargs.get("processes"):
            return TaskConcurrencyType.PARALLEL
        return TaskConcurrencyType.CONCURRENT

    # -- lifecycle ------------------------------------------------------------------

    def _open(self) -> None:
        distributed = _import_distributed()
        self._reconnect_error = None
        if self.address:
            self.logger.info("Connecting to an existing Dask cluster at %s", self.address)
            client = self._connect(distributed)
            self._owns_cluster = False
            self._workers_in_process = self._has_workers_in_process(client)
        else:
            if self.cluster_class is None:
                self.cluster_class = distributed.LocalCluster
            self.logger.info(
                "Creating a new Dask cluster with `%s`", _qualified_name(self.cluster_class)
            )
            kwargs, in_process = self._cluster_kwargs_to_use(distributed)
            cluster = self.cluster_class(**kwargs)
            try:
                if self.adapt_kwargs:
                    cluster.adapt(**self.adapt_kwargs)
                client = distributed.Client(cluster, **self.client_kwargs)
            except BaseException:
                cluster.close()
                raise
            self._cluster = cluster
            self._owns_cluster = True
            self._workers_in_process = (
                in_process if in_process is not None else self._has_workers_in_process(client)
            )
        self._client = client
        self._fetcher = _StateFetcher(self, client)
        try:
            link = self._dashboard_link(client, distributed)
            if link:
                self.logger.info("The Dask dashboard is available at %s", link)
            if not self._workers_in_process:
                self._forward_logs(client)
        except BaseException:
            self._release(abort=True)
            raise

    def _dashboard_link(self, client: Any, distributed: Any) -> Optional[str]:
        link = client.dashboard_link
        if link and self._cluster is not None and self._dashboard_on_loopback:
            # Dask builds the link from the scheduler's address, which for in-process
            # transport is this machine's IP, not the loopback the dashboard is on.
            try:
                port = self._cluster.scheduler_info["services"]["dashboard"]
                link = distributed.utils.format_dashboard_link("127.0.0.1", port)
            except Exception:
                pass
        return link

    def _cluster_kwargs_to_use(self, distributed: Any) -> tuple:
        """The kwargs for the cluster, with loopback-only defaults for a LocalCluster.

        Returns them and whether the workers will run in this process (None: unknown).
        """
        kwargs = dict(self.cluster_kwargs)
        self._dashboard_on_loopback = False
        cluster_class = self.cluster_class
        if not (isinstance(cluster_class, type) and issubclass(cluster_class, distributed.LocalCluster)):
            return kwargs, None
        processes = kwargs.get("processes")
        if processes is None:
            worker_class = kwargs.get("worker_class")
            processes = worker_class is None or issubclass(worker_class, distributed.Nanny)
        # Dask's own defaults serve the dashboard, and in-process workers' HTTP
        # servers, on every interface; the scheduler and worker comms already
        # default to 127.0.0.1 (or in-process transport).
        if not any(kwargs.get(name) for name in ("host", "ip", "interface")):
            self._dashboard_on_loopback = "dashboard_address" not in kwargs
            kwargs.setdefault("dashboard_address", "127.0.0.1:8787")
            if not processes:
                kwargs.setdefault("worker_dashboard_address", "127.0.0.1:0")
        return kwargs, not processes

    def _connect(self, distributed: Any) -> Any:
        import tenacity

        address = self.address
        client_kwargs = dict(self.client_kwargs)
        attempt_timeout = client_kwargs.pop("timeout", None)
        deadline = time.monotonic() + self.connect_timeout

        def attempt() -> Any:
            remaining = max(deadline - time.monotonic(), 0.5)
            timeout = attempt_timeout or min(remaining, _CONNECT_ATTEMPT_SECONDS)
            return distributed.Client(address, timeout=timeout, **client_kwargs)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(self.connect_timeout),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            retry=tenacity.retry_if_exception_type((OSError, *TIMEOUT_ERRORS)),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except (OSError, *TIMEOUT_ERRORS) as exc:
            raise RuntimeError(
                f"Could not connect to the Dask scheduler at {address!r} within "
                f"{self.connect_timeout:g} s ({exc}). Check that the scheduler is running "
                "and reachable at that address, or give it longer with `connect_timeout`."
            ) from exc

    def _has_workers_in_process(self, client: Any) -> bool:
        scheduler_address = getattr(client.scheduler, "address", "") or ""
        if scheduler_address.startswith("inproc://"):
            return True
        try:
            pids = client.run(os.getpid)
        except Exception:
            return False
        return os.getpid() in pids.values()

    def _forward_logs(self, client: Any) -> None:
        address = client.scheduler.address
        with _log_subscribers_lock:
            subscribers = _log_subscribers.setdefault(address, [])
            first = not subscribers
            subscribers.append(client)
        if first:
            client.forward_logging()

    def _stop_forwarding_logs(self, client: Any) -> None:
        address = getattr(client.scheduler, "address", None)
        successor = None
        with _log_subscribers_lock:
            subscribers = _log_subscribers.get(address)
            if not subscribers or client not in subscribers:
                return
            was_first = subscribers[0] is client
            subscribers.remove(client)
            if not subscribers:
                del _log_subscribers[address]
            elif was_first:
                successor = subscribers[0]
        if successor is not None:
            try:
                successor.forward_logging()
            except Exception:
                self.logger.warning("Could not hand worker log forwarding to another runner.")

    def _close(self) -> None:
        self._release(abort=False)

    def _abort(self, exc: BaseException) -> None:
        client = self._client
        unfinished = [
            call.dask_future
            for call in list(self._pending)
            if isinstance(call, _DaskCall) and call.dask_future is not None and not call.done()
        ]
        for call in list(self._pending):
            # The Dask futures are cancelled below, all at once.
            concurrent.futures.Future.cancel(call)
        if unfinished and client is not None and self._client_usable(client):
            # Workers of a process cluster the runner created are stopped below;
            # other workers are told, so that a call about to start does not.
            if not (self._owns_cluster and not self._workers_in_process):
                try:
                    client.run(_cancel_calls, [future.key for future in unfinished])
                except Exception:
                    self.logger.debug("Cancelling calls on the workers failed", exc_info=True)
            try:
                client.cancel(unfinished)
            except Exception:
                self.logger.debug("Cancelling the Dask futures failed", exc_info=True)
        self._release(abort=True)

    def _release(self, abort: bool) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = self._fetcher = None
        if client is not None:
            self._stop_forwarding_logs(client)
        if abort and cluster is not None and self._owns_cluster:
            self._stop_workers_now(cluster)
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None and self._owns_cluster:
                cluster.close()
        # Nothing can settle calls any more (an abort cancelled them already).
        for call in list(self._pending):
            settle(call, Crashed(message="The Dask client closed before the call's State arrived."))

    def _stop_workers_now(self, cluster: Any) -> None:
        """Stop the workers of a cluster the runner created, without waiting for calls."""
        distributed = _import_distributed()
        workers = list(getattr(cluster, "workers", {}).values())
        if not workers or not hasattr(cluster, "sync"):
            return

        async def stop(worker: Any) -> None:
            if isinstance(worker, distributed.Nanny):
                # The worker process gets a short grace period, then is killed.
                await worker.close(timeout=_KILL_GRACE_SECONDS)
            elif isinstance(worker, distributed.Worker):
                await worker.close(executor_wait=False, timeout=_KILL_GRACE_SECONDS)

        async def stop_all() -> None:
            await asyncio.gather(*(stop(worker) for worker in workers), return_exceptions=True)

        try:
            cluster.sync(stop_all)
        except Exception:
            self.logger.debug("Stopping the Dask workers early failed", exc_info=True)

    @staticmethod
    def _client_usable(client: Any) -> bool:
        return getattr(client, "status", None) in ("running", "connecting", "newly-created")

    # -- submission -----------------------------------------------------------------

    def _submit_call(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> _DaskCall:
        if not self._started or self._detached or self._reconnect_error is not None:
            self._ensure_usable("submit work")
        client = self._client
        if client is None:
            raise RuntimeError("The task runner must be started before submitting work.")
        call = _DaskCall(client)
        waiting = []
        if run_kwargs and not all(type(value) in _FLAT_TYPES for value in run_kwargs.values()):
            for future in iter_leaves(run_kwargs, _is_future):
                upstream_call = self._call_of(future)
                if not upstream_call.done() and not self._can_hand_off(upstream_call, client):
                    waiting.append(upstream_call)
        if waiting:
            self._start_after(waiting, call, task_run, run_fn, run_kwargs, by_value=False)
        else:
            self._start(call, task_run, run_fn, run_kwargs, by_value=False)
        self._track(call)
        return call

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> _DaskCall:
        call = _DaskCall(self._client)
        self._start(call, task_run, run_fn, run_kwargs, by_value=True)
        return call

    @staticmethod
    def _can_hand_off(call: Any, client: Any) -> bool:
        """Whether ``call`` can reach a downstream call as its Dask future.

        A call that failed in Dask and is settled goes by value; one not settled yet
        is handed off anyway, and its downstream call is rerun if Dask fails it.
        """
        if type(call) is not _DaskCall or call.client is not client:
            return False
        dask_future = call.dask_future
        if dask_future is None:
            return False
        return not call.done() or dask_future.status not in ("error", "cancelled")

    def _start_after(
        self,
        upstream: List[Any],
        call: _DaskCall,
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        by_value: bool,
        annotations: Optional[Dict[str, Any]] = None,
        rerun: bool = False,
    ) -> None:
        """Start ``call`` once the upstream calls are done, holding nothing meanwhile."""
        if annotations is None:
            import dask

            annotations = dask.get_annotations()

        def upstream_done() -> None:
            if call.done():  # cancelled meanwhile
                return
            try:
                self._start(call, task_run, run_fn, run_kwargs, by_value, annotations, rerun)
            except BaseException as exc:
                settle(call, exception_to_crashed_state(exc))

        when_all_done(upstream, upstream_done)

    def _start(
        self,
        call: _DaskCall,
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
        by_value: bool,
        annotations: Optional[Dict[str, Any]] = None,
        rerun: bool = False,
    ) -> None:
        """Submit ``call`` to Dask; its upstream calls are done or handed to Dask."""
        client = call.client
        upstream_futures: List[Any] = []
        handed_off: List[tuple] = []  # (call, the Dask future handed off)
        kwargs = run_kwargs
        if run_kwargs:
            indexes: Dict[int, int] = {}

            def replace(value: Any) -> Any:
                if not isinstance(value, PrefectFuture):
                    return value
                upstream_call = self._call_of(value)
                if not by_value and self._can_hand_off(upstream_call, client):
                    index = indexes.get(id(upstream_call))
                    if index is None:
                        index = indexes[id(upstream_call)] = len(upstream_futures)
                        upstream_futures.append(upstream_call.dask_future)
                        handed_off.append((upstream_call, upstream_call.dask_future))
                    return _Upstream(index)
                return self._state_of_done(upstream_call)

            kwargs = visit_collection(run_kwargs, replace)
        try:
            payload = cloudpickle.dumps((run_fn, kwargs))
        except Exception as exc:
            settle(
                call,
                Crashed(
                    message=f"The call's function or arguments could not be pickled: {exc!r}.",
                    data=exc,
                ),
            )
            return
        key = f"{task_run.name}-{task_run.id.hex}"
        if rerun:  # the first key is taken by the Dask task that failed
            key += "-rerun"
        if annotations:
            import dask

            context: Any = dask.annotate(**annotations)
        else:
            context = nullcontext()
        try:
            with context:
                dask_future = client.submit(
                    _run_on_worker, payload, key, upstream_futures or None, key=key, pure=True
                )
        except Exception as exc:
            settle(call, Crashed(message=f"Dask refused the call: {exc!r}.", data=exc))
            return
        call.dask_future = dask_future
        if handed_off:
            call.rerun = (task_run, run_fn, run_kwargs, annotations, handed_off)
        fetcher = self._fetcher or self._fetcher_for(client)
        fetcher.watch(call, dask_future)

    def _fetcher_for(self, client: Any) -> _StateFetcher:
        with self._lifecycle_lock:
            if self._fetcher is None:
                self._fetcher = _StateFetcher(self, client)
            return self._fetcher

    def _settle_failure(self, call: _DaskCall, exc: BaseException) -> None:
        """Settle a call whose Dask task raised ``exc`` (on the client's loop)."""
        rerun = call.rerun
        if rerun is not None:
            task_run, run_fn, run_kwargs, annotations, handed_off = rerun
            if any(
                dask_future.status in ("error", "cancelled") for _, dask_future in handed_off
            ):
                # Dask fails the dependents of a failed task without running them,
                # but a call must receive its upstream's State, whatever it is: run
                # it again with the upstream States passed by value. Until then no
                # downstream call may be handed the failed Dask future.
                call.rerun = None
                call.dask_future = None
                upstream = [upstream_call for upstream_call, _ in handed_off]
                self._start_after(
                    upstream, call, task_run, run_fn, run_kwargs, True, annotations, True
                )
                return
        settle(call, self._failure_state(call, exc))

    def _failure_state(self, call: Any, exc: BaseException) -> State:
        if isinstance(exc, _CrashedOnWorker):
            return exc.state
        if isinstance(exc, _import_distributed().KilledWorker):
            return Crashed(
                message="The Dask worker running this call died (killed, out of memory "
                "or exited) on every attempt Dask made (see the scheduler's "
                f"`distributed.scheduler.allowed-failures`): {exc}",
                data=exc,
            )
        if isinstance(exc, (concurrent.futures.CancelledError, asyncio.CancelledError)):
            return exception_to_crashed_state(exc)
        return Crashed(
            message=f"Dask could not run the call or return its State: {exc!r}", data=exc
        )

    # -- pickling -------------------------------------------------------------------

    def _ensure_attached(self, action: str) -> None:
        if self._reconnect_error is not None:
            raise RuntimeError(
                f"The {self.name} task runner cannot be used to {action} after "
                f"serialization here: it reconnects only inside a task on a Dask worker "
                f"(distributed.get_client() failed: {self._reconnect_error}). Use the "
                "original runner, or start a new one."
            )
        super()._ensure_attached(action)

    def __setstate__(self, data: Dict[str, Any]) -> None:
        super().__setstate__(data)
        if not self._started:
            return
        try:
            distributed = _import_distributed()
            distributed.get_worker()
            self._client = distributed.get_client()
        except Exception as exc:
            self._reconnect_error = f"{type(exc).__name__}: {exc}"
            self._detached = True
        else:
            self._reconnect_error = None
            self._owns_cluster = False


def _is_future(value: Any) -> bool:
    return isinstance(value, PrefectFuture)

