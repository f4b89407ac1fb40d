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

This module owns the runner: its settings, its ``start()`` block, submitting and
settling calls, pickling. Its parts: :mod:`~taskrunners._core.dask.calls` (call
handle, fetching States, cancelling), :mod:`~taskrunners._core.dask.worker` (what
runs on the workers), :mod:`~taskrunners._core.dask.cluster` (a block's client and
cluster), :mod:`~taskrunners._core.dask.dask_private` (distributed's private names).

Details of how calls run: a call alone is keyed ``f"{task_run.name}-{task_run.id.hex}"``
with ``pure=True`` (a task run submitted twice runs once), a batch
``f"{task_name}-batch-{hex}"``; calls with different ``dask.annotate`` values, or with
Dask ``retries``, never share a batch; a returned State is never retried. A coroutine
``run_fn`` runs on an event loop of its own in a worker thread. A call handle's
``cancel()`` refuses once a worker started the call. Pickled, the runner drops its
client and cluster; unpickled inside a task on a Dask worker it reconnects with
``distributed.get_client()``, elsewhere it refuses work with a RuntimeError.

A hazard of its own: Dask fails the dependents of a failed task without running
them, but a call must receive its upstream's State, whatever it is. Such a call is
run again with its upstream States by value (``_settle_failure``).
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import cloudpickle

from taskrunners._core.base import BlockingTaskRunner, TaskConcurrencyType, may_hold_futures
from taskrunners._core.batching import BatchSize, Durations, check_batch_size
from taskrunners._core.calls import CallHandle, state_of_done, when_all_done
from taskrunners._core.dask import cluster as dask_cluster, worker as dask_worker
from taskrunners._core.dask.batches import DaskBatches, submit_annotated
from taskrunners._core.dask.calls import (
    CLIENT_CLOSED,
    DaskBatch,
    DaskCall,
    StateFetcher,
    Submission,
    abort_calls,
    cancel_unstarted,
    dask_future_to_hand_off,
    failure_state,
    forget_token,
    unpicklable_call_state,
)
from taskrunners._core.remote.protocol import import_engine, with_upstream
from taskrunners._core.remote.snapshots import snapshot_call
from taskrunners._core.futures import TaskRun
from taskrunners.states import Crashed, exception_to_crashed_state

__all__ = ["DaskTaskRunner"]


def _import_distributed() -> Any:
    return import_engine("distributed", "DaskTaskRunner")


class DaskTaskRunner(BlockingTaskRunner):
    """Runs calls on a Dask cluster: a temporary one it creates, or one it connects to.

    Example (``Completed`` comes from :mod:`taskrunners.states`)::

        with DaskTaskRunner(cluster_kwargs={"n_workers": 2}).start() as runner:
            future = runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {"x": 21})
            runner.wait(future).result()  # 42

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
    :param batch_size: how many calls one engine task may carry: ``"auto"`` (the
        default) groups the calls of one task while every worker is busy, as many as
        take about a tenth of a second, learned from how long its calls take; ``1``
        sends every call as an engine task of its own; a number fixes the size
    :raises ValueError: for ``address`` together with cluster options, for
        ``asynchronous`` in ``cluster_kwargs`` or ``client_kwargs``, for a
        ``cluster_class`` name that cannot be imported, a bad ``connect_timeout`` or
        ``batch_size``
    :raises TypeError: for kwargs that are not dicts, and for a key of ``cluster_kwargs``
        or ``client_kwargs`` that the cluster class (a LocalCluster: or the workers it
        creates) or ``distributed.Client`` does not take, naming the closest valid key.
        A cluster class given as an object is checked at once; a LocalCluster and the
        Client are checked at once if ``distributed`` is already imported, else (as the
        runner does not import it before it starts) by ``start()``, before anything is
        created. A cluster class that takes ``**kwargs`` takes any key.

    What it starts and stops: without ``address``, ``start()`` creates the cluster
    and a client, and the end of the block closes both; a ``LocalCluster`` it creates
    listens on 127.0.0.1 only, unless ``cluster_kwargs`` name another host or
    interface. With ``address`` it only opens a client, and closes only that. Leaving
    the block with an exception cancels the calls not started and stops the workers of
    a cluster the runner created; a plain call already running on a cluster it did not
    create runs to its end.

    Function and arguments travel with cloudpickle; each call sees its arguments as
    they were at ``submit``. A call sent alone is the Dask task
    ``f"{task_run.name}-{task_run.id.hex}"``; while the workers are busy, calls of one
    task go in batches, one Dask task each, every call keeping its own State.
    ``dask.annotate(...)`` around a submission (resources, priority, retries, workers)
    applies to that call. Records a call logs on a worker reach this process's loggers.

    A worker that dies while running a call: Dask runs the call again on another
    worker, up to ``distributed.scheduler.allowed-failures`` (3 by default), then the
    call is Crashed naming the cause. A lost batch runs again whole, so calls of it
    may run twice. Calls on the other workers go on.
    """

    _handles = ("_client", "_cluster", "_fetcher", "_tokens", "_forwarder", "_batches", "_durations")
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

        # The client, and the cluster if the runner created it (see dask_cluster.Connection).
        self._client: Any = None
        self._cluster: Any = None
        self._workers_in_process = False
        # What run_task does with log records and results (see there).
        self._capture: Optional[Tuple[int, bool]] = None
        self._fetcher: Optional[StateFetcher] = None
        # The dispatcher and batches of a block (None with batch_size=1).
        self._batches: Optional[DaskBatches] = None
        # Why an unpickled runner has no client (distributed.get_client() failed).
        self._reconnect_error: Optional[str] = None
        super().__init__()

    def _init_bookkeeping(self) -> None:
        super()._init_bookkeeping()
        # The token of the Dask task each key in flight names: a call submitted under
        # a key Dask already holds shares that task, so it must share its token.
        self._tokens: Dict[str, str] = {}
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
        self._workers_in_process, self._capture = connection.workers_in_process, connection.capture
        self._fetcher = self._new_fetcher(connection.client)
        self._batches = self._new_batches(connection.client)

    def _new_batches(self, client: Any) -> Optional[DaskBatches]:
        return None if self.batch_size == 1 else DaskBatches(self, client, self._durations)

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
        client, cluster = self._client, self._cluster
        self._client = self._cluster = self._fetcher = self._batches = None
        try:
            dask_cluster.close_connection(client, cluster, abort, self.logger)
        finally:
            self._tokens.clear()
        # Nothing can settle calls any more (an abort cancelled them already).
        for call in self._pending_calls():
            call.set_result(Crashed(message=CLIENT_CLOSED))

    def _pending_calls(self) -> List[DaskCall]:
        return [call for call in list(self._pending) if isinstance(call, DaskCall)]

    # -- submission -----------------------------------------------------------------

    def _submit_call(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> DaskCall:
        if not self._started or self._detached or self._reconnect_error is not None:
            self._ensure_usable("submit work")
        run_fn, run_kwargs = snapshot_call(run_fn, run_kwargs)
        call = self._dispatch(task_run, run_fn, run_kwargs)
        self._track(call)
        return call

    def _dispatch_after(
        self,
        upstream: List[Any],
        task_run: TaskRun,
        run_fn: Callable[..., Any],
        run_kwargs: Dict[str, Any],
    ) -> DaskCall:
        # task.map's calls with upstream futures go as submit's: handed Dask futures.
        return self._dispatch(task_run, run_fn, run_kwargs)

    def _dispatch(
        self, task_run: TaskRun, run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]
    ) -> DaskCall:
        """Start a call, its upstream calls done or not (every submission comes here)."""
        client = self._client
        if client is None:
            raise self._not_started()
        call = DaskCall(self, client)
        batches = self._batches
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
            self._start_after(waiting, call, submission, by_value=False)
        else:
            self._launch(call, submission, upstream)
        return call

    def _launch(self, call: DaskCall, submission: Submission, upstream: List[Any]) -> None:
        """Start ``call``: through the dispatcher if its upstream calls are all done,
        else alone, handed the Dask futures of those still running."""
        batches = self._batches
        if batches is None or not all(upstream_call.done() for upstream_call in upstream):
            self._start(call, submission, by_value=False)
        else:
            batches.submit(call, submission)

    def _dispatch_many(
        self,
        task_runs: List[TaskRun],
        run_fn: Callable[..., Any],
        run_kwargs_list: List[Dict[str, Any]],
    ) -> List[CallHandle]:
        batches = self._batches
        if batches is None:
            return super()._dispatch_many(task_runs, run_fn, run_kwargs_list)
        annotations = batches.current_annotations()
        calls = [DaskCall(self, self._client) for _ in task_runs]
        pairs = zip(task_runs, run_kwargs_list)
        batches.submit_many(calls, [Submission(run, run_fn, kw, annotations) for run, kw in pairs])
        return list(calls)

    def _start_after(
        self,
        upstream: List[Any],
        call: DaskCall,
        submission: Submission,
        by_value: bool,
        rerun: bool = False,
    ) -> None:
        """Start ``call`` once the upstream calls are done, holding nothing meanwhile."""
        if submission.annotations is None:
            import dask

            submission = submission._replace(annotations=dask.get_annotations())

        def upstream_done() -> None:
            call.waiting_on = None
            if call.done():  # cancelled meanwhile
                return
            try:
                if by_value:
                    self._start(call, submission, by_value, rerun)
                else:
                    self._launch(call, submission, self._upstream_calls(submission.run_kwargs))
            except BaseException as exc:
                call.set_result(exception_to_crashed_state(exc))

        call.waiting_on = upstream
        when_all_done(upstream, upstream_done)

    def _start(
        self,
        call: DaskCall,
        submission: Submission,
        by_value: bool,
        rerun: bool = False,
        sent: Optional[DaskBatch] = None,
    ) -> bool:
        """Submit ``call`` to Dask; its upstream calls are done or handed to Dask.

        :param sent: the dispatcher sends the call, as this batch of one: the worker
            also tells how long it ran, and the batch is what is watched
        :return: whether Dask was given the call
        """
        task_run, run_fn, run_kwargs, annotations = submission
        client = call.client
        # (upstream call, the Dask future handed off), by that future, in the order of
        # the placeholders with_upstream() makes.
        handed_off: Dict[int, Tuple[DaskCall, Any]] = {}

        def hand_off(upstream_call: Any) -> Any:
            dask_future = None if by_value else dask_future_to_hand_off(upstream_call, client)
            if dask_future is not None:
                handed_off.setdefault(id(dask_future), (upstream_call, dask_future))
            return dask_future

        kwargs = run_kwargs
        if any(may_hold_futures(value) for value in run_kwargs.values()):
            kwargs, _ = with_upstream(run_kwargs, self._call_of, state_of_done, hand_off)
        upstream = [(dask_future.key, dask_future) for _, dask_future in handed_off.values()]
        try:
            payload = cloudpickle.dumps((run_fn, kwargs))
        except Exception as exc:
            call.set_result(unpicklable_call_state(exc))
            return False
        key = f"{task_run.name}-{task_run.id.hex}"
        if rerun:  # the first key is taken by the Dask task that failed
            key += "-rerun"
        refused: Optional[Exception] = None
        with call.handover:
            if call.cancelling or call.done():
                return False
            token = self._tokens.setdefault(key, uuid.uuid4().hex)
            submit = functools.partial(
                client.submit,
                dask_worker.run_task,
                payload,
                key,
                token,
                upstream or None,
                self._capture,
                *((True,) if sent is not None else ()),
                key=key,
                pure=True,
            )
            try:
                dask_future = submit_annotated(annotations, submit, exact=sent is not None)
            except Exception as exc:
                refused = exc
                self._tokens.pop(key, None)
            else:
                call.key, call.token, call.dask_future = key, token, dask_future
        if refused is not None:
            call.set_result(Crashed(message=f"Dask refused the call: {refused!r}.", data=refused))
            return False
        if handed_off:
            call.rerun = (submission, list(handed_off.values()))
        fetcher = self._fetcher or self._fetcher_for(client)
        if sent is None:
            fetcher.watch(call, dask_future)
        else:
            sent.dask_future = dask_future
            fetcher.watch(sent, dask_future)
        return True

    def _new_fetcher(self, client: Any) -> StateFetcher:
        return StateFetcher(client, self._settle_outcome, self._settle_failure)

    def _fetcher_for(self, client: Any) -> StateFetcher:
        with self._lifecycle_lock:
            if self._fetcher is None:
                self._fetcher = self._new_fetcher(client)
            return self._fetcher

    def _settle_outcome(self, call: DaskCall, value: Any) -> None:
        """Settle a call with what its Dask task returned (on the client's loop)."""
        state, records, tag = dask_worker.decoded(call.key or "?", value)
        self._forwarder.forward(records, tag)
        forget_token(self._tokens, call)
        call.rerun = None
        call.set_result(state)

    def _settle_failure(self, call: DaskCall, exc: BaseException) -> None:
        """Settle a call whose Dask task raised ``exc`` (on the client's loop)."""
        rerun = call.rerun
        if rerun is not None:
            submission, handed_off = rerun
            if any(
                dask_future.status in ("error", "cancelled") for _, dask_future in handed_off
            ):
                # Run it again with the upstream States by value (see the module's
                # docstring). Until then no downstream call may be handed the failed
                # Dask future.
                with call.handover:
                    if call.cancelling:
                        return
                    forget_token(self._tokens, call)
                    call.rerun = None
                    call.dask_future = call.token = None
                upstream = [upstream_call for upstream_call, _ in handed_off]
                self._start_after(upstream, call, submission, by_value=True, rerun=True)
                return
        if isinstance(exc, dask_worker.CrashedOnWorker):
            self._settle_outcome(call, exc.outcome)
            return
        forget_token(self._tokens, call)
        call.set_result(failure_state(exc, in_batch=False))

    # -- cancellation ------------------------------------------------------------------

    def _cancel_unstarted(self, calls: Iterable[Any]) -> None:
        """Cancel each of ``calls`` that no worker has started (see ``cancel_unstarted``)."""
        cancel_unstarted(calls, self._tokens, self.logger)

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
            self._batches = self._new_batches(self._client)

