"""The blocking DaskTaskRunner: calls run on a Dask cluster through a synchronous Client.

How a call travels::

    submit ── cloudpickle (run_fn, run_kwargs) ──▶ client.submit(run_task, key=...)
           upstream calls of this runner go as their Dask futures (Upstream(n)
           placeholders); those of other runners, once done, as their States
    worker ── dask_worker.run_task ──▶ the call's State, pickled there with its log
           records on workers outside this process
    client loop ── StateFetcher gathers the States of finished calls in batches
           ──▶ DaskCall.set_result; the records go to this process's loggers

With ``batch_size="auto"`` a call whose upstream calls are all done goes through
the runner's dispatcher instead: :mod:`~taskrunners._core.dask.batches`.

This module owns the runner: its settings, its ``start()`` block, routing each call,
pickling. A block composes its parts and hands each call its dispatcher: a
:class:`~taskrunners._core.dask.submitter.DaskSubmitter` (a call as a Dask task of its
own, settling it), and, unless ``batch_size=1``, a
:class:`~taskrunners._core.dask.batches.DaskBatches` (the dispatcher and batches).
The other modules: :mod:`~taskrunners._core.dask.calls` (call handle, fetching
States, cancelling), :mod:`~taskrunners._core.dask.worker` (what runs on the
workers), :mod:`~taskrunners._core.dask.cluster` (a block's client and cluster),
:mod:`~taskrunners._core.dask.dask_private` (distributed's private names).

Details of how calls run: a call alone is keyed ``f"{task_run.name}-{task_run.id.hex}"``
with ``pure=True`` (a task run submitted twice runs once), a batch
``f"{task_name}-batch-{hex}"``; calls with different ``dask.annotate`` values, or with
Dask ``retries``, never share a batch; a returned State is never retried. A coroutine
``run_fn`` runs on an event loop of its own in a worker thread. A call handle's
``cancel()`` refuses once a worker started the call. Pickled, the runner drops its
client and cluster; unpickled inside a task on a Dask worker it reconnects with
``distributed.get_client()``, elsewhere it refuses work with a RuntimeError.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union


from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType
from taskrunners._core.batching import BatchSize, Durations, check_batch_size
from taskrunners._core.calls import CallHandle
from taskrunners._core.dask import cluster as dask_cluster
from taskrunners._core.dask.batches import DaskBatches
from taskrunners._core.dask.calls import (
    CLIENT_CLOSED,
    DaskCall,
    Submission,
    abort_calls,
    cancel_unstarted,
    dask_future_to_hand_off,
)
from taskrunners._core.dask.submitter import DaskSubmitter, start_after
from taskrunners._core.dask.timeouts import TimeoutPolicy
from taskrunners._core.remote.protocol import import_engine
from taskrunners._core.dask.scattered import ScatteredValues
from taskrunners._core.remote.sharing import DEFAULT_LARGE_VALUE_BYTES, check_large_value_bytes
from taskrunners._core.settings import BATCH_SIZE_DOC, LARGE_VALUE_BYTES_DOC, Setting
from taskrunners._core.futures import TaskRun
from taskrunners.states import Crashed

__all__ = ["DaskTaskRunner"]


def _import_distributed() -> Any:
    return import_engine("distributed", "DaskTaskRunner")


class DaskTaskRunner(BlockingTaskRunner):
    """Runs calls on a Dask cluster: a temporary one it creates, or one it connects to.

    Example (``Completed`` comes from :mod:`taskrunners.states`)::

        with DaskTaskRunner(cluster_kwargs={"n_workers": 2}).start() as runner:
            future = runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {"x": 21})
            runner.wait(future).result()  # 42

    The variables Dask sets for the workers of a cluster it creates
    (``distributed.nanny.pre-spawn-environ``: ``MALLOC_TRIM_THRESHOLD_``, the thread
    counts; ``PYTHONHASHSEED``) stay theirs: this process's own are put back, so that
    processes it starts later do not inherit them.

    :param address: a running scheduler to connect to, e.g. ``"tcp://127.0.0.1:8786"``;
        None to create a temporary cluster
    :param cluster_class: the temporary cluster's class, or its dotted name (imported at
        once); None for ``distributed.LocalCluster``
    :param cluster_kwargs: keyword arguments for ``cluster_class``
    :param adapt_kwargs: keyword arguments for ``cluster.adapt()``; adaptive scaling
        only when given
    :param client_kwargs: keyword arguments for ``distributed.Client``
        (``set_as_default`` defaults to False)
    :param connect_timeout: seconds to keep trying to reach ``address``
    :param batch_size: calls per Dask task: ``"auto"`` gathers calls of one task while
        the workers are busy, as many as take about 0.1 s; a number fixes the size
    :param large_value_bytes: an argument that pickles to this many bytes or more is
        scattered once and reaches each worker once, however many calls take it;
        None sends it with every call
    :raises ValueError: for ``address`` with cluster options, ``asynchronous`` in
        ``cluster_kwargs`` or ``client_kwargs``, a ``cluster_class`` name that cannot be
        imported, a bad ``connect_timeout`` or ``batch_size``
    :raises TypeError: for kwargs that are not dicts, or a key the cluster class or
        ``Client`` does not take, naming the closest valid key (checked by ``start()``
        when ``distributed`` is not imported yet)

    ``start()`` creates the cluster and a client, and the block's end closes both (a
    LocalCluster it creates listens on 127.0.0.1 only, unless ``cluster_kwargs`` name a
    host or interface); with ``address`` it opens and closes only a client. Leaving the
    block with an exception cancels the calls not started and stops the workers of a
    cluster it created (on another cluster, running calls run on). Each call sees its
    arguments as they were at ``submit``; ``dask.annotate(...)`` around a submission
    applies to that call; what a call logs on a worker reaches this process's loggers.
    A call whose worker dies is run again by Dask, up to
    ``distributed.scheduler.allowed-failures`` times, then Crashed (a lost batch runs
    again whole). Workers are recycled by Dask's own settings, through
    ``cluster_kwargs``: ``memory_limit``, ``lifetime`` with ``lifetime_restart=True``.

    A call past its ``timeout_seconds`` is interrupted in its worker thread; one blocked
    in C is TimedOut about half a second after its limit all the same, its thread
    leaves the worker's pool, and its worker is restarted if the runner created the
    cluster with worker processes (never otherwise: a warning says the work may still
    run). The other calls of its batch run once each (see ``dask.timeouts``).
    """

    address: Setting[Optional[str]] = Setting("The scheduler to connect to; None for a temporary cluster.")
    cluster_class: Setting[Optional[Callable[..., Any]]] = Setting(
        "The class of the temporary cluster; None until started, for LocalCluster."
    )
    cluster_kwargs: Setting[Dict[str, Any]] = Setting("Keyword arguments for :attr:`cluster_class`.")
    adapt_kwargs: Setting[Dict[str, Any]] = Setting(
        "Keyword arguments for ``cluster.adapt()``; adaptive scaling only when given."
    )
    client_kwargs: Setting[Dict[str, Any]] = Setting("Keyword arguments for ``distributed.Client``.")
    connect_timeout: Setting[float] = Setting("Seconds to keep trying to reach :attr:`address`.")
    batch_size: Setting[BatchSize] = Setting(BATCH_SIZE_DOC)
    large_value_bytes: Setting[Optional[int]] = Setting(LARGE_VALUE_BYTES_DOC)

    _handles = ("_client", "_cluster", "_submitter", "_forwarder", "_batches", "_durations", "_shared", "_environment")
    _usable_after_pickling = True
    _snapshots_arguments = True

    def __init__(
        self,
        address: Optional[str] = None,
        cluster_class: Union[str, Callable[..., Any], None] = None,
        cluster_kwargs: Optional[Dict[str, Any]] = None,
        adapt_kwargs: Optional[Dict[str, Any]] = None,
        client_kwargs: Optional[Dict[str, Any]] = None,
        connect_timeout: float = 30.0,
        *,
        batch_size: BatchSize = "auto",
        large_value_bytes: Optional[int] = DEFAULT_LARGE_VALUE_BYTES,
    ) -> None:
        resolved = dask_cluster.checked_settings(
            address, cluster_class, cluster_kwargs, adapt_kwargs, connect_timeout
        )
        client_kwargs = dask_cluster.checked_kwargs("client_kwargs", client_kwargs)
        cluster_kwargs = dask_cluster.checked_kwargs("cluster_kwargs", cluster_kwargs)
        # Against distributed's signatures, imported for that when there are keys to
        # check (and checked again at start(), as the settings may change meanwhile).
        distributed = dask_cluster.distributed_for_checks(cluster_kwargs, client_kwargs)
        dask_cluster.check_keywords(resolved, cluster_kwargs, client_kwargs, distributed)
        client_kwargs.setdefault("set_as_default", False)

        self.address = address
        self.cluster_class = resolved
        self.cluster_kwargs = cluster_kwargs
        self.adapt_kwargs = dask_cluster.checked_kwargs("adapt_kwargs", adapt_kwargs)
        self.client_kwargs = client_kwargs
        self.connect_timeout = float(connect_timeout)
        self.batch_size = check_batch_size(batch_size)
        self.large_value_bytes = check_large_value_bytes(large_value_bytes)

        # The client, and the cluster if the runner created it (see dask_cluster.Connection).
        self._client: Any = None
        self._cluster: Any = None
        self._environment: Optional[Dict[str, Optional[str]]] = None
        self._workers_in_process = False
        # What run_task does with log records and results (see there).
        self._capture: Optional[Tuple[int, bool]] = None
        # The parts of a block: what submits calls alone and settles them, and the
        # dispatcher and batches (None with batch_size=1).
        self._submitter: Optional[DaskSubmitter] = None
        self._batches: Optional[DaskBatches] = None
        # Why an unpickled runner has no client (distributed.get_client() failed).
        self._reconnect_error: Optional[str] = None
        super().__init__()

    def _init_bookkeeping(self) -> None:
        super()._init_bookkeeping()
        self._forwarder = dask_cluster.RecordForwarder()
        # How long each task's calls take: kept from one block to the next.
        self._durations = Durations(self.batch_size)

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        if self.cluster_kwargs.get("processes"):
            return TaskConcurrencyType.PARALLEL
        return TaskConcurrencyType.CONCURRENT

    # -- lifecycle ------------------------------------------------------------------

    def _open(self) -> None:
        distributed = _import_distributed()
        dask_cluster.check_keywords(
            self.cluster_class, self.cluster_kwargs, self.client_kwargs, distributed
        )
        self._reconnect_error = None
        if self.address:
            connection = dask_cluster.connect(
                self.address, self.client_kwargs, self.connect_timeout, distributed, self.logger
            )
        else:
            if self.cluster_class is None:
                self.cluster_class = distributed.LocalCluster
            connection = dask_cluster.create(
                self.cluster_class,
                self.cluster_kwargs,
                self.adapt_kwargs,
                self.client_kwargs,
                distributed,
                self.logger,
            )
        self._client, self._cluster = connection.client, connection.cluster
        self._environment = connection.environment
        self._workers_in_process, self._capture = connection.workers_in_process, connection.capture
        self._compose(connection.client)

    def _compose(self, client: Any) -> None:
        """The parts of a block on ``client``."""
        submitter = DaskSubmitter(client, self._capture, self._forwarder, self._call_of, self.logger)
        if self.large_value_bytes is not None:
            self._shared = submitter.shared = ScatteredValues(self.large_value_bytes, client)
        self._submitter = submitter
        self._batches = (
            None
            if self.batch_size == 1
            else DaskBatches(submitter, self._durations)
        )
        # A stuck call's worker is restarted only on a cluster of processes it created.
        restarts = self._cluster is not None and not self._workers_in_process
        submitter.timeouts = TimeoutPolicy(client, restarts, self._batches, submitter.tokens, self.logger)

    def _close(self) -> None:
        self._release(abort=False)

    def _abort(self, exc: BaseException) -> None:
        if self._batches is not None:  # gathered calls are cancelled below, never sent
            self._batches.dispatcher.drop_gathered()
        # Workers of a process cluster the runner created are stopped by _release;
        # other workers are told, so that a call about to start does not.
        tell_workers = self._cluster is None or self._workers_in_process
        abort_calls(self._client, self._pending_calls(), tell_workers, self.logger)
        self._release(abort=True)

    def _release(self, abort: bool) -> None:
        client, cluster, submitter = self._client, self._cluster, self._submitter
        self._client = self._cluster = self._submitter = self._batches = None
        if submitter is not None and submitter.timeouts is not None:
            submitter.timeouts.close(0.0 if abort else 60.0)
        self._close_shared()
        environment, self._environment = self._environment, None
        dask_cluster.close_connection(client, cluster, abort, self.logger, environment)
        # Nothing can settle calls any more (an abort cancelled them already).
        for call in self._pending_calls():
            call.set_result(Crashed(message=CLIENT_CLOSED))

    def _pending_calls(self) -> List[DaskCall]:
        return [call for call in list(self._pending) if isinstance(call, DaskCall)]

    # -- submission -----------------------------------------------------------------

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> DaskCall:
        # Upstream calls Dask holds are handed to it as Dask futures: see _dispatch.
        return self._dispatch(task_run, run_fn, run_kwargs)

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> DaskCall:
        """Start a call, its upstream calls done or not (every submission comes here)."""
        client, submitter, batches = self._client, self._submitter, self._batches
        if client is None or submitter is None:
            raise self._not_started()
        call = self._new_call(client, submitter, batches)
        # The dispatcher may send it later, from another thread: its annotations now.
        annotations = None if batches is None else batches.current_annotations()
        submission = Submission(task_run, run_fn, run_kwargs, annotations)
        upstream = self._upstream_calls(run_kwargs)
        # Upstream calls that Dask cannot be handed are waited for here.
        waiting = [
            upstream_call
            for upstream_call in upstream
            if not upstream_call.done() and dask_future_to_hand_off(upstream_call, client) is None
        ]
        if waiting:
            start_after(
                waiting,
                call,
                submission,
                lambda ready: self._launch(call, ready, self._upstream_calls(ready.run_kwargs)),
            )
        else:
            self._launch(call, submission, upstream)
        return call

    def _launch(self, call: DaskCall, submission: Submission, upstream: List[Any]) -> None:
        """Start ``call``: through the dispatcher if its upstream calls are all done,
        else alone, handed the Dask futures of those still running."""
        batches, submitter = self._batches, self._submitter
        if submitter is None:  # the block ended meanwhile
            call.set_result(Crashed(message=CLIENT_CLOSED))
        elif batches is None or not all(upstream_call.done() for upstream_call in upstream):
            submitter.start(call, submission, by_value=False)
        else:
            batches.submit(call, submission)

    def _dispatch_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
    ) -> List[CallHandle]:
        batches, submitter = self._batches, self._submitter
        if batches is None or submitter is None:
            return super()._dispatch_many(task_runs, run_fn, run_kwargs_list)
        annotations = batches.current_annotations()
        calls = [self._new_call(batches.client, submitter, batches) for _ in task_runs]
        pairs = zip(task_runs, run_kwargs_list)
        batches.submit_many(calls, [Submission(run, run_fn, kw, annotations) for run, kw in pairs])
        return list(calls)

    def _new_call(
        self, client: Any, submitter: DaskSubmitter, batches: Optional[DaskBatches]
    ) -> DaskCall:
        """A call of the block, handed the block's dispatcher and canceller."""
        return DaskCall(client, None if batches is None else batches.dispatcher, submitter.cancel_unstarted)

    # -- cancellation ------------------------------------------------------------------

    def _cancel_unstarted(self, calls: Iterable[Any]) -> None:
        """Cancel each of ``calls`` that no worker has started (see ``cancel_unstarted``)."""
        submitter = self._submitter
        cancel_unstarted(calls, {} if submitter is None else submitter.tokens, self.logger)

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
            self._compose(self._client)

