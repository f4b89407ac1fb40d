"""The worker side of the DaskTaskRunner: what runs in Dask's workers.

Dask runs :func:`run_task` for a call sent alone. It marks the call started in this
worker process's registry, puts the States of upstream calls in place of their
placeholders, runs the call to a State (:func:`~taskrunners._core.remote.protocol.run_in_worker`)
and, on workers outside the client's process, pickles that State here together
with the log records the call emitted (so a State that cannot be pickled becomes
the call's own Crashed state, not a Dask serialization failure logged far away).
A call the runner's dispatcher sent also brings back how long it ran, which sizes
the batches of its task.

Dask runs :func:`run_batch_task` for a batch: the calls of one task, gathered while
every worker was busy. Each call keeps its own token in the registry and is marked
started and finished on its own, so cancelling one that has not started stays exact;
the batch brings back each call's State and seconds, pickled together
(:func:`~taskrunners._core.remote.protocol.encode_batch`: one State that cannot be pickled
fails only its call).

The registry is what lets the client cancel a call only if it has not started: a
Dask client cannot see whether a task has begun on a worker, and Dask cannot stop
one that has. A call marks itself started under a lock unless a cancellation got
there first; a cancellation (:func:`cancel_unstarted_calls`, run with
``Client.run`` on every worker) marks the calls not started as cancelled under
the same lock and reports the others. The client's half of this is in
:mod:`~taskrunners._core.dask.calls`; it runs the public functions below the
registry the same way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import pickle
import struct
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

from taskrunners._core.dask import dask_private, expiry
from taskrunners._core.limits import Limited
from taskrunners._core.dask.scattered import payloads_here
from taskrunners._core.remote.protocol import (
    decode_batch,
    CoroutineWatch,
    decode_outcome,
    encode_batch,
    encode_outcome,
    load_call,
    run_batch,
    run_in_worker,
    substitute,
)
from taskrunners._core.remote.records import captured_records
from taskrunners._core.remote import sharing
from taskrunners._core.remote.sharing import DEFAULT_LARGE_VALUE_BYTES, placed
from taskrunners.states import State, exception_to_crashed_state

__all__ = [
    "WHERE",
    "CrashedOnWorker",
    "run_task",
    "run_batch_task",
    "batch_payload",
    "with_seconds",
    "seconds_of",
    "decoded",
    "started_calls",
    "cancel_unstarted_calls",
    "forget_cancellations",
    "abort_calls",
]

WHERE = "the Dask worker"
_ADVICE = (
    ", or run the call on a threads cluster (`cluster_kwargs={'processes': False}`), "
    "whose States stay in this process"
)

# The calls of this worker process, by token (one per Dask task the runner creates):
# those started and not finished (None, or (loop, task) for a coroutine call, which
# can be cancelled where it awaits), and, for the last few thousand calls, those
# finished and those cancelled before they started. A cancellation may reach a worker
# before its task does, and a finished call's State may still be on its way back.
_registry_lock = threading.Lock()
_running: "dict[str, Optional[Tuple[asyncio.AbstractEventLoop, asyncio.Task[State]]]]" = {}
_finished: "collections.OrderedDict[str, None]" = collections.OrderedDict()
_cancelled: "collections.OrderedDict[str, None]" = collections.OrderedDict()
_REMEMBERED_TOKENS = 10_000


class CrashedOnWorker(Exception):
    """Raised on a worker so that Dask's ``retries`` apply to a call that crashed.

    ``outcome`` is what the call returns otherwise: its State, or its encoded outcome.
    """

    def __init__(self, outcome: Any, message: Optional[str]) -> None:
        super().__init__(outcome, message)
        self.outcome = outcome
        self.message = message

    def __str__(self) -> str:
        return f"the call crashed: {self.message}"

    def __repr__(self) -> str:  # Dask logs it; the outcome may be a large pickle
        return f"{type(self).__name__}({self.message!r})"


def run_task(
    payload: bytes,
    key: str,
    token: str,
    upstream: Optional[List[Tuple[str, Any]]],
    capture: Optional[Tuple[int, bool]],
    timed: bool = False,
    shared: Optional[List[Tuple[str, str, Any]]] = None,
) -> Any:
    """What Dask runs for a call sent alone: the call, to its State.

    :param upstream: (key, outcome) of each upstream call handed to Dask, in the
        order of their placeholders
    :param capture: for workers outside the client's process, the lowest log level
        to send back and whether to hide those records from this process's handlers;
        the value is then the State and the records pickled here (else the State)
    :param timed: whether the value also tells how many seconds the call ran (0 if
        it did not start): see :func:`with_seconds`; :func:`decoded` reads either
    :param shared: the large values the call takes (see ``dask.scattered``)
    """
    if not _mark_started(token):
        state = exception_to_crashed_state(concurrent.futures.CancelledError())
        cancelled = state if capture is None else encode_outcome(key, state, [], WHERE)
        return with_seconds(cancelled, 0.0) if timed else cancelled
    capturing: ContextManager[List[Any]] = captured_records(*capture) if capture else nullcontext([])
    begun = time.perf_counter()
    try:
        with capturing as records:
            with placed(payloads_here(shared)):
                state, raised = _run_call(payload, key, token, upstream)
    finally:
        _mark_finished(token)
    seconds = time.perf_counter() - begun
    if capture is None:
        outcome: Any = state
    else:
        tag = uuid.uuid4().hex if records else None
        outcome = encode_outcome(key, state, records, WHERE, tag, _ADVICE)
    if timed:
        outcome = with_seconds(outcome, seconds)
    if isinstance(raised, Exception) and dask_private.retries_requested(key):
        raise CrashedOnWorker(outcome, state.message) from raised
    return outcome


# A timed outcome pickled on the worker: this mark, the seconds, the pickle. A pickle
# (protocol 2 and up) starts with b"\x80", never with the mark.
_TIMED_MARK = b"T"
_SECONDS = struct.Struct("<d")


def with_seconds(outcome: Any, seconds: float) -> Any:
    """``outcome`` and the seconds its call ran, as one value.

    A pickled outcome stays bytes, as Dask sends bytes much faster than a tuple
    holding them; an outcome left unpickled (a worker in the client's process) is
    paired in a tuple, which nothing serializes.
    """
    if isinstance(outcome, bytes):
        return b"".join((_TIMED_MARK, _SECONDS.pack(seconds), outcome))
    return (outcome, seconds)


def seconds_of(value: Any) -> Optional[float]:
    """How many seconds the call ran, from what :func:`run_task` returned; None if it
    was not timed."""
    if type(value) is tuple:
        return float(value[1])
    if isinstance(value, bytes) and value[:1] == _TIMED_MARK:
        return float(_SECONDS.unpack_from(value, 1)[0])
    return None


def batch_payload(names: Sequence[str], tokens: Sequence[str], calls: bytes) -> bytes:
    """What :func:`run_batch_task` is given: the calls' names, tokens, and the calls
    themselves (``cloudpickle.dumps((pairs, None))``, ``pairs`` the ``(run_fn,
    run_kwargs)`` of each: the shape :func:`~taskrunners._core.remote.protocol.load_call`
    reads), in one value that Dask does not walk."""
    return pickle.dumps((list(names), list(tokens), calls), pickle.HIGHEST_PROTOCOL)


def run_batch_task(
    payload: bytes,
    capture: Optional[Tuple[int, bool]],
    shared: Optional[List[Tuple[str, str, Any]]] = None,
) -> Any:
    """What Dask runs for a batch: its calls in order, each to its State and seconds.

    A call cancelled before it started here is skipped (its State is the
    cancellation, its seconds 0); a call that raises or crashes takes no other call
    of the batch with it. With ``capture`` (see :func:`run_task`) the value is the
    States, seconds and log records pickled here (else the list of (State, seconds)).
    ``shared``: the large values its calls take (see ``dask.scattered``).
    """
    names, tokens, calls_payload = pickle.loads(payload)
    with placed(payloads_here(shared)):
        calls, unloadable = _load_batch(calls_payload, names)
    if unloadable is not None:
        outcomes = [(unloadable, 0.0)] * len(names)
        return outcomes if capture is None else encode_batch(names, outcomes, [], WHERE)
    running: List[str] = []  # the token of the call running now
    ran: List[Tuple[State, float, Optional[BaseException]]] = []  # filled as calls end

    def starting(index: int) -> bool:
        token = tokens[index]
        running[:] = [token]
        return _mark_started(token)

    def finished(index: int) -> None:
        _mark_finished(tokens[index])

    def watch(loop: asyncio.AbstractEventLoop, task: "asyncio.Task[State]") -> ContextManager[None]:
        return _registered(running[0])(loop, task)

    expire: Optional[Callable[[int], Any]] = None
    if type(calls[0][0]) is Limited:  # a batch's calls share their run_fn, so their limit
        worker = expiry.current_worker()

        def expire(index: int) -> Any:
            def freeze() -> Any:
                if not _freeze(tokens[index], tokens[index + 1 :]):
                    return None
                done = [(state, seconds) for state, seconds, _ in ran[:index]]
                return (encode_batch(names[:index], done, [], WHERE) if done else None,)

            return expiry.expiry(tokens[0], index, freeze, worker)

    capturing: ContextManager[List[Any]] = captured_records(*capture) if capture else nullcontext([])
    with capturing as records:
        run_names = None if expire is None else [expiry.run_name(name) for name in names]
        run_batch(calls, watch, starting, finished, expire, run_names, ran)
    outcomes = [(state, seconds) for state, seconds, _ in ran]
    if capture is None:
        return outcomes
    return encode_batch(names, outcomes, records, WHERE, _ADVICE)


def _load_batch(payload: bytes, names: List[str]) -> Tuple[Any, Optional[State]]:
    """The batch's ``(run_fn, run_kwargs)`` pairs, or the Crashed state of every call."""
    what = names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more in its batch)"
    calls, unloadable = load_call(payload, what, WHERE)
    if calls is None:
        return None, unloadable
    return calls, None


def _run_call(
    payload: bytes, key: str, token: str, upstream: Optional[List[Tuple[str, Any]]]
) -> Tuple[State, Optional[BaseException]]:
    run_fn, run_kwargs = load_call(payload, key, WHERE)
    if run_fn is None:
        return run_kwargs, None
    if upstream:
        states: Dict[Hashable, State] = {
            index: _upstream_state(name, outcome) for index, (name, outcome) in enumerate(upstream)
        }
        run_kwargs = substitute(run_kwargs, states.__getitem__)
    if type(run_fn) is not Limited:
        return run_in_worker(run_fn, run_kwargs, watch=_registered(token))
    expire = expiry.expiry(
        token, 0, lambda: (None,) if _freeze(token, ()) else None, expiry.current_worker()
    )
    return run_in_worker(run_fn, run_kwargs, _registered(token), expire, expiry.run_name(key))


class HandedOff:
    """In a call's arguments: an upstream call's large State, left where Dask holds it
    (its own task's value, or its batch's at ``position``). The call's task depends on
    that key (see ``dask.scattered``), and the worker decodes the State once for every
    call there that takes it."""

    __slots__ = ("key", "reference", "position")

    def __init__(self, dask_future: Any, position: Optional[int]) -> None:
        self.key = f"upstream-{dask_future.key}"
        self.reference = dask_future
        self.position = position

    def __reduce__(self) -> Tuple[Any, ...]:
        if not sharing.collect(self):
            raise pickle.PicklingError("An upstream State left in Dask travels only with a task.")
        return (_handed_off_state, (self.reference.key, self.position))


def _handed_off_state(name: str, position: Optional[int]) -> State:
    outcome = sharing.placed_payload(f"upstream-{name}")
    if position is None:
        return _upstream_state(name, outcome)
    if not isinstance(outcome, bytes):  # a batch in this process: its outcomes as they are
        return outcome[position][0]
    outcomes = _decoded_once(name, outcome, lambda: decode_batch([name], outcome)[0])
    return outcomes[position][0]


def _upstream_state(name: str, outcome: Any) -> State:
    """An upstream call's State; a large one is decoded once in this worker, for every
    call here that takes it (as Dask hands one object to every task that depends on a
    key), while the worker holds the key."""
    if not isinstance(outcome, bytes):
        return decoded(name, outcome)[0]
    return _decoded_once(name, outcome, lambda: decoded(name, outcome)[0])


def _decoded_once(name: str, outcome: bytes, decode: Callable[[], Any]) -> Any:
    if len(outcome) < DEFAULT_LARGE_VALUE_BYTES:
        return decode()
    import distributed

    data = distributed.get_worker().data
    return sharing.load(f"upstream-{name}", decode, lambda: name in data)


def decoded(name: str, value: Any) -> Tuple[State, Optional[List[Any]], Optional[str]]:
    """(State, log records, their tag) from what :func:`run_task` returned."""
    if type(value) is tuple:  # timed, unpickled
        value = value[0]
    if isinstance(value, bytes):
        if value[:1] == _TIMED_MARK:
            # Unpickled in place: pickle reads any bytes-like value, no copy of a large State.
            pickled = memoryview(value)[1 + _SECONDS.size :]
            return decode_outcome(name, pickled)  # type: ignore[arg-type]
        return decode_outcome(name, value)
    return value, None, None


# -- the registry ------------------------------------------------------------------------


def _remember(tokens: "collections.OrderedDict[str, None]", token: str) -> None:
    tokens[token] = None
    if len(tokens) > _REMEMBERED_TOKENS:
        tokens.popitem(last=False)


def _mark_started(token: str) -> bool:
    """Mark the call started here; False if it was cancelled first (do not run it)."""
    with _registry_lock:
        if token in _cancelled:
            return False
        _running[token] = None
        return True


def _mark_finished(token: str) -> None:
    with _registry_lock:
        _running.pop(token, None)
        _remember(_finished, token)


def _freeze(token: str, later: Sequence[str]) -> bool:
    """A call past its limit: whether it still runs here; if so, the ``later`` calls of
    its batch will not start here (the client runs them elsewhere)."""
    with _registry_lock:
        if token not in _running:
            return False
        for other in later:
            _remember(_cancelled, other)
        return True


def _registered(token: str) -> CoroutineWatch:
    """The watch for a coroutine call: it can be cancelled where it awaits."""

    @contextmanager
    def watch(loop: asyncio.AbstractEventLoop, task: "asyncio.Task[State]") -> Iterator[None]:
        with _registry_lock:
            if token in _cancelled:  # aborted since it was marked started: not begun
                raise asyncio.CancelledError
            _running[token] = (loop, task)
        try:
            yield
        finally:
            with _registry_lock:
                _running[token] = None

    return watch


def _started_here(token: str) -> bool:
    return token in _running or token in _finished


def started_calls(tokens: List[str]) -> List[str]:
    """Run on workers (``Client.run``): which of these calls started here."""
    with _registry_lock:
        return [token for token in tokens if _started_here(token)]


def cancel_unstarted_calls(tokens: List[str]) -> List[str]:
    """Run on workers (``Client.run``): no call of these that has not started here
    will start here; returns those that had started here."""
    started = []
    with _registry_lock:
        for token in tokens:
            if _started_here(token):
                started.append(token)
            else:
                _remember(_cancelled, token)
    return started


def forget_cancellations(tokens: List[str]) -> None:
    """Run on workers (``Client.run``): these calls were not cancelled after all (they
    had started on another worker), so a retry of one may start here."""
    with _registry_lock:
        for token in tokens:
            _cancelled.pop(token, None)


def abort_calls(tokens: List[str]) -> int:
    """Run on workers when the block is left with an exception: none of these calls
    starts any more, and coroutine calls running here are cancelled where they await.
    A plain call already running cannot be stopped. Returns how many were cancelled.
    """
    cancelled = 0
    with _registry_lock:
        for token in tokens:
            _remember(_cancelled, token)
            running = _running.get(token)
            if running is not None:
                loop, task = running
                try:
                    loop.call_soon_threadsafe(task.cancel)
                    cancelled += 1
                except RuntimeError:  # that loop just closed
                    pass
    return cancelled
