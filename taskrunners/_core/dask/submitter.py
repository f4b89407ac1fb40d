"""How the DaskTaskRunner hands one call to Dask as a Dask task of its own, and settles
what comes back.

:class:`DaskSubmitter` is the part of :class:`~taskrunners._core.dask.runner.DaskTaskRunner`
that one ``start()`` block (or an unpickled runner on a worker) composes: it holds the
block's client, the tokens of the Dask tasks in flight and the
:class:`~taskrunners._core.dask.fetcher.StateFetcher`, whose client-loop callbacks settle
each call. Batches go through :mod:`~taskrunners._core.dask.batches`, which hands its
batches of one call back to :meth:`DaskSubmitter.start`.

A hazard of its own: Dask fails the dependents of a failed task without running
them, but a call must receive its upstream's State, whatever it is. Such a call is
run again with its upstream States by value (:meth:`DaskSubmitter.settle_failure`).
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import cloudpickle

from taskrunners._core.arguments import may_hold_futures
from taskrunners._core.calls import CallHandle, state_of_done, when_all_done
from taskrunners._core.dask import worker as dask_worker
from taskrunners._core.dask.annotations import submit_annotated
from taskrunners._core.dask.calls import (
    DaskBatch,
    DaskCall,
    Submission,
    cancel_unstarted,
    dask_future_to_hand_off,
    handed_off,
    failure_state,
    forget_token,
    unpicklable_call_state,
)
from taskrunners._core.dask.fetcher import StateFetcher
from taskrunners._core.dask.cluster import RecordForwarder
from taskrunners._core.dask.scattered import ScatteredValues, dependencies
from taskrunners._core.limits import Limited
from taskrunners._core.remote.protocol import with_upstream
from taskrunners._core.remote.sharing import collecting
from taskrunners._core.remote.snapshots import maybe_large, shared_state
from taskrunners.states import Crashed, exception_to_crashed_state

__all__ = ["DaskSubmitter", "start_after"]


class DaskSubmitter:
    """Submits calls to one client as Dask tasks of their own, and settles them.

    :param client: the client of the block
    :param capture: what ``run_task`` does with log records and results (see there)
    :param forwarder: hands the records calls logged on workers to this process's loggers
    :param call_of: the runner's call behind a future found in a call's arguments
    :param logger: the runner's logger
    """

    def __init__(
        self,
        client: Any,
        capture: Optional[Tuple[int, bool]],
        forwarder: RecordForwarder,
        call_of: Callable[[Any], CallHandle],
        logger: logging.Logger,
    ) -> None:
        self.client = client
        self.capture = capture
        self.forwarder = forwarder
        self.call_of = call_of
        self._logger = logger
        #: The token of the Dask task each key in flight names: a call submitted under
        #: a key Dask already holds shares that task, so it must share its token.
        self.tokens: Dict[str, str] = {}
        self._fetcher = StateFetcher(client, self.settle_outcome, self.settle_failure)
        #: Where the block's large values are scattered (see ``dask.scattered``), if it is.
        self.shared: Optional[ScatteredValues] = None
        #: What the block does with calls stuck past their limit (``dask.timeouts``).
        self.timeouts: Any = None

    def by_value(self, call: CallHandle) -> Any:
        """What stands for a done upstream call in the arguments of a call that takes it
        by value: a large State Dask holds stays there (:class:`~taskrunners._core.dask.
        worker.HandedOff`); any other goes as it is, its large data shared."""
        state = state_of_done(call)
        shared = self.shared
        if shared is None:
            return state
        if maybe_large(state.data, shared.threshold):
            handed = handed_off(call, self.client)
            if handed is not None:
                return handed
        return shared_state(state, shared)

    def watch(self, watched: Any, dask_future: Any) -> None:
        """Settle ``watched`` (a call, or a batch) once ``dask_future`` is done."""
        self._fetcher.watch(watched, dask_future)

    def start(
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
            kwargs, _ = with_upstream(run_kwargs, self.call_of, self.by_value, hand_off)
        upstream = [(dask_future.key, dask_future) for _, dask_future in handed_off.values()]
        try:
            with collecting() as collected:
                payload = cloudpickle.dumps((run_fn, kwargs))
        except Exception as exc:
            call.set_result(unpicklable_call_state(exc))
            return False
        shared = dependencies(collected)
        key = f"{task_run.name}-{task_run.id.hex}"
        if rerun:  # the first key is taken by the Dask task that failed
            key += "-rerun"
        refused: Optional[Exception] = None
        with call.handover:
            if call.cancelling or call.done():
                return False
            token = self.tokens.setdefault(key, uuid.uuid4().hex)
            call.shared = collected or None  # before Dask may settle it
            submit = functools.partial(
                client.submit,
                dask_worker.run_task,
                payload,
                key,
                token,
                upstream or None,
                self.capture,
                *((True,) if sent is not None else ()),
                **({} if shared is None else {"shared": shared}),
                key=key,
                pure=True,
            )
            try:
                dask_future = submit_annotated(annotations, submit, exact=sent is not None)
            except Exception as exc:
                refused = exc
                self.tokens.pop(key, None)
            else:
                call.key, call.token, call.dask_future = key, token, dask_future
        if refused is not None:
            call.set_result(Crashed(message=f"Dask refused the call: {refused!r}.", data=refused))
            return False
        if handed_off:
            call.rerun = (submission, list(handed_off.values()))
        if type(run_fn) is Limited and self.timeouts is not None:
            self.timeouts.register([call], token, task_run.name, run_fn.seconds, sent, dask_future)
            if sent is not None:
                sent.expiring = token
        if sent is None:
            self._fetcher.watch(call, dask_future)
        else:
            sent.dask_future = dask_future
            self._fetcher.watch(sent, dask_future)
        return True

    def settle_outcome(self, call: DaskCall, value: Any) -> None:
        """Settle a call with what its Dask task returned (on the client's loop)."""
        state, records, tag = dask_worker.decoded(call.key or "?", value)
        self.forwarder.forward(records, tag)
        forget_token(self.tokens, call)
        call.rerun = None
        call.set_result(state)

    def settle_failure(self, call: DaskCall, exc: BaseException) -> None:
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
                    forget_token(self.tokens, call)
                    call.rerun = None
                    call.dask_future = call.token = None
                upstream = [upstream_call for upstream_call, _ in handed_off]
                start_after(
                    upstream,
                    call,
                    submission,
                    lambda again: self.start(call, again, by_value=True, rerun=True),
                )
                return
        if isinstance(exc, dask_worker.CrashedOnWorker):
            self.settle_outcome(call, exc.outcome)
            return
        forget_token(self.tokens, call)
        call.set_result(failure_state(exc, in_batch=False))

    def cancel_unstarted(self, calls: Iterable[Any]) -> None:
        """Cancel each of ``calls`` that no worker has started (see ``cancel_unstarted``)."""
        cancel_unstarted(calls, self.tokens, self._logger)


def start_after(
    upstream: List[Any], call: DaskCall, submission: Submission, start: Callable[[Submission], Any]
) -> None:
    """``start(submission)`` once the upstream calls are done, unless ``call`` is done by
    then; nothing is held meanwhile. The submission keeps this thread's annotations."""
    if submission.annotations is None:
        import dask

        submission = submission._replace(annotations=dask.get_annotations())

    def upstream_done() -> None:
        call.waiting_on = None
        if call.done():  # cancelled meanwhile
            return
        try:
            start(submission)
        except BaseException as exc:
            call.set_result(exception_to_crashed_state(exc))

    call.waiting_on = upstream
    when_all_done(upstream, upstream_done)
