"""What the runners that send calls to other processes share: Parallel, Dask and Ray.

How a call travels::

    parent: (run_fn, run_kwargs) ── with_upstream() ──▶ futures become Upstream(n)
            placeholders for what the engine hands over (a Dask future, a Ray
            ObjectRef), or the upstream call's State itself ("by value")
    worker: substitute() puts the upstream States in place; run_in_worker() runs the
            call to a State (a coroutine run_fn on an event loop of its own, which a
            backend may watch: Dask's cancel registry, Ray's interrupt tick);
            encode_outcome() pickles the State and the call's log records
    parent: decode_outcome() ──▶ the call's State; its records go to the loggers here
"""

from __future__ import annotations

import asyncio
import importlib
import pickle
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, cast

import cloudpickle
import sniffio

from taskrunners._collections import visit_collection
from taskrunners._core.calls import CallHandle, cancelled_state
from taskrunners._core.limits import Limited, ThreadGuard, split_limit, thread_guard, timed_out_state
from taskrunners._core.running import checked_state, is_coroutine_function, run_limited
from taskrunners._core.futures import PrefectFuture
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = [
    "Upstream",
    "with_upstream",
    "substitute",
    "CoroutineWatch",
    "Expire",
    "COROUTINE_GRACE_SECONDS",
    "run_in_worker",
    "run_batch",
    "load_call",
    "portable_error",
    "encode_outcome",
    "encode_batch",
    "decode_outcome",
    "decode_batch",
    "import_engine",
]

PROTOCOL = pickle.HIGHEST_PROTOCOL

#: What a backend may do around a coroutine call running in a worker: a context
#: manager given the call's loop and task. Raising ``asyncio.CancelledError`` on entry
#: refuses to begin the call (it then ends as cancelled).
CoroutineWatch = Callable[["asyncio.AbstractEventLoop", "asyncio.Task[State]"], AbstractContextManager]


class Upstream:
    """Stands in a call's arguments for the result of an upstream call, found by ``key``."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key

    def __reduce__(self) -> Tuple[Any, ...]:
        return (Upstream, (self.key,))

    def __eq__(self, other: object) -> bool:
        return type(other) is Upstream and other.key == self.key

    def __hash__(self) -> int:
        return hash((Upstream, self.key))

    def __repr__(self) -> str:
        return f"Upstream({self.key!r})"


def with_upstream(
    run_kwargs: Dict[str, Any],
    call_of: Callable[[Any], CallHandle],
    state_of: Callable[[CallHandle], State],
    hand_off: Callable[[CallHandle], Any],
) -> Tuple[Dict[str, Any], List[Any]]:
    """``run_kwargs`` with each future in it replaced, and what the engine must deliver.

    A future whose call ``hand_off`` gives an engine reference for (not None) becomes
    ``Upstream(n)``, ``n`` its reference's place in the returned list (equal references
    share one); any other becomes its call's State, by value.
    """
    places: Dict[Any, Upstream] = {}
    references: List[Any] = []

    def replace(value: Any) -> Any:
        if not isinstance(value, PrefectFuture):
            return value
        call = call_of(value)
        reference = hand_off(call)
        if reference is None:
            return state_of(call)
        placeholder = places.get(reference)
        if placeholder is None:
            placeholder = places[reference] = Upstream(len(references))
            references.append(reference)
        return placeholder

    return visit_collection(run_kwargs, replace), references


def substitute(expr: Any, lookup: Callable[[Hashable], Any]) -> Any:
    """``expr`` with each :class:`Upstream` placeholder replaced by ``lookup(key)``."""
    return visit_collection(
        expr, lambda value: lookup(value.key) if type(value) is Upstream else value
    )


#: What a backend does when a call's limit passes in its worker: given the call's
#: thread guard (see ``limits.run_limited``), it stops the work its own way (raises
#: into the thread, restarts or ends the worker process).
Expire = Callable[[ThreadGuard], object]
#: How much longer than its limit a coroutine call gets to end by its cancellation
#: before its backend's ``Expire`` acts (a coroutine blocked in C never sees it).
COROUTINE_GRACE_SECONDS = 0.5


def run_in_worker(
    run_fn: Callable[..., Any],
    run_kwargs: Dict[str, Any],
    watch: Optional[CoroutineWatch] = None,
    expire: Optional[Expire] = None,
    name: str = "call",
) -> Tuple[State, Optional[BaseException]]:
    """Run a call to its State in a thread with no event loop; also what it raised.

    A coroutine ``run_fn`` runs on an event loop of its own, inside ``watch(loop,
    task)`` if given. A call with a time limit (a ``limits.Limited`` run_fn) is
    stopped once it passes: a plain one by ``expire``, a coroutine by its
    cancellation (and by ``expire`` if it has not ended a moment later); its State
    is then the task run ``name``'s TimedOut state.
    """
    run_fn, seconds = split_limit(run_fn)
    if seconds is not None and expire is not None:
        if not is_coroutine_function(run_fn):
            return run_limited(run_fn, run_kwargs, seconds, name, expire), None
        guard = thread_guard()
        guard.arm(seconds + COROUTINE_GRACE_SECONDS, expire)
        try:
            return _run_coroutine(run_fn, run_kwargs, watch, seconds, name)
        finally:
            guard.close()
    if not is_coroutine_function(run_fn):
        try:
            return checked_state(run_fn, run_fn(**run_kwargs)), None
        except BaseException as exc:
            return exception_to_crashed_state(exc), exc
    return _run_coroutine(run_fn, run_kwargs, watch, seconds, name)


def _run_coroutine(
    run_fn: Callable[..., Any],
    run_kwargs: Dict[str, Any],
    watch: Optional[CoroutineWatch],
    seconds: Optional[float],
    name: str,
) -> Tuple[State, Optional[BaseException]]:
    raised: List[BaseException] = []
    timed_out: List[bool] = []

    async def run() -> State:
        sniffio.current_async_library_cvar.set(None)  # asyncio here, whatever the caller ran
        timer = None
        if seconds is not None:
            task = asyncio.current_task()
            assert task is not None

            def expired() -> None:
                timed_out.append(True)
                task.cancel()

            timer = asyncio.get_running_loop().call_later(seconds, expired)
        try:
            value = await run_fn(**run_kwargs)
        except BaseException as exc:
            if timed_out:
                return timed_out_state(name, cast(float, seconds))
            raised.append(exc)
            return exception_to_crashed_state(exc)
        finally:
            if timer is not None:
                timer.cancel()
        return checked_state(run_fn, value)

    async def watched() -> State:
        if watch is None:
            return await run()
        with watch(asyncio.get_running_loop(), asyncio.current_task()):  # type: ignore[arg-type]
            return await run()

    try:
        state = asyncio.run(watched())
    except BaseException as exc:  # cancelled before it started
        return exception_to_crashed_state(exc), None
    return state, raised[0] if raised else None


def run_batch(
    calls: Sequence[Tuple[Callable[..., Any], Dict[str, Any]]],
    watch: Optional[CoroutineWatch] = None,
    starting: Optional[Callable[[int], bool]] = None,
    finished: Optional[Callable[[int], None]] = None,
    expire: Optional[Callable[[int], Expire]] = None,
    names: Optional[Sequence[str]] = None,
    outcomes: Optional[List[Tuple[State, float, Optional[BaseException]]]] = None,
) -> List[Tuple[State, float, Optional[BaseException]]]:
    """Run the calls of one batch in order: each one's State, seconds and what it raised.

    ``starting(i)`` is called before call ``i`` runs, and may say it must not (it was
    cancelled meanwhile: its State is then the cancellation); ``finished(i)`` after.
    ``expire(i)`` is what stops call ``i`` if it has a limit and passes it; ``names``
    name the calls in their TimedOut states. A call that raises affects no other call
    of its batch. ``outcomes``: the list to fill and return, where a backend can read
    those of the calls finished so far (a new one if None).
    """
    if outcomes is None:
        outcomes = []
    for index, (run_fn, run_kwargs) in enumerate(calls):
        if starting is not None and not starting(index):
            outcomes.append((cancelled_state(), 0.0, None))
            continue
        begun = time.perf_counter()
        if expire is None or type(run_fn) is not Limited:
            state, raised = run_in_worker(run_fn, run_kwargs, watch)
        else:
            name = names[index] if names is not None else "call"
            state, raised = run_in_worker(run_fn, run_kwargs, watch, expire(index), name)
        outcomes.append((state, time.perf_counter() - begun, raised))
        if finished is not None:
            finished(index)
    return outcomes


def load_call(payload: bytes, name: str, where: str) -> Tuple[Any, Any]:
    """``(run_fn, run_kwargs)`` unpickled from ``payload``, or ``(None, Crashed state)``."""
    try:
        return cloudpickle.loads(payload)
    except BaseException as exc:
        return None, Crashed(
            message=f"Task run {name!r} could not be unpickled in {where}: "
            f"{type(exc).__name__}: {exc}. Make sure it can import every module that "
            "run_fn and its arguments refer to.",
            data=exc,
        )


def portable_error(exc: BaseException) -> BaseException:
    """An exception with the type and message of ``exc`` that pickles.

    ``exc`` itself may hold the very value that could not be pickled; where its type
    cannot be rebuilt from the message alone, a ``PicklingError`` carries it.
    """
    message = str(exc)
    try:
        rebuilt = type(exc)(message)
        if str(rebuilt) == message:
            cloudpickle.dumps(rebuilt, PROTOCOL)
            return rebuilt
    except Exception:
        pass
    return pickle.PicklingError(message)


def encode_outcome(
    name: str,
    state: State,
    records: List[Any],
    where: str,
    tag: Optional[str] = None,
    advice: str = "",
) -> bytes:
    """The call's State, log records and ``tag``, pickled to travel back from a worker.

    A State that cannot be pickled becomes a Crashed state holding the pickling error
    (rebuilt: see :func:`portable_error`), saying so and how to fix it.
    """
    from taskrunners._core.remote.records import plain_record

    outcome = (state, records or None, tag)
    try:
        # Plain pickle first, as it is the faster. For what only cloudpickle can send
        # (a class or function that came here by value) it fails instead of writing a
        # reference, since the name does not lead back to the same object here.
        return pickle.dumps(outcome, PROTOCOL)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(outcome, PROTOCOL)
    except Exception:
        pass
    try:
        cloudpickle.dumps(state, PROTOCOL)
    except Exception as exc:
        state = _unpicklable_state(name, exc, where, advice)
    plain = [plain_record(record) for record in records]
    return cloudpickle.dumps((state, plain or None, tag), PROTOCOL)


def encode_batch(
    names: Sequence[str],
    outcomes: Sequence[Tuple[State, float]],
    records: List[Any],
    where: str,
    advice: str = "",
) -> bytes:
    """The States and durations of a batch's calls and their log records, pickled.

    One State that cannot be pickled becomes a Crashed state (as in
    :func:`encode_outcome`) and takes no other call's State with it.
    """
    from taskrunners._core.remote.records import plain_record

    try:
        return pickle.dumps((list(outcomes), records or None, None), PROTOCOL)
    except Exception:
        pass
    try:
        return cloudpickle.dumps((list(outcomes), records or None, None), PROTOCOL)
    except Exception:
        pass
    sendable = []
    for name, (state, seconds) in zip(names, outcomes):
        try:
            cloudpickle.dumps(state, PROTOCOL)
        except Exception as exc:
            state = _unpicklable_state(name, exc, where, advice)
        sendable.append((state, seconds))
    plain = [plain_record(record) for record in records]
    return cloudpickle.dumps((sendable, plain or None, None), PROTOCOL)


def _unpicklable_state(name: str, exc: BaseException, where: str, advice: str) -> State:
    return Crashed(
        message=f"The State returned by task run {name!r} could not be pickled to send "
        f"it back from {where}: {type(exc).__name__}: {exc}. Return only data that "
        f"cloudpickle can serialize{advice}.",
        data=portable_error(exc),
    )


def decode_outcome(name: str, data: bytes) -> Tuple[State, Optional[List[Any]], Optional[str]]:
    """(State, log records, tag) from what :func:`encode_outcome` made."""
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        message = (
            f"The State of task run {name!r} could not be unpickled in this process: "
            f"{type(exc).__name__}: {exc}. Return only data of modules this process can "
            "import."
        )
        return Crashed(message=message, data=exc), None, None


def decode_batch(
    names: Sequence[str], data: bytes
) -> Tuple[List[Tuple[State, float]], Optional[List[Any]]]:
    """(each call's State and seconds, the batch's log records) from :func:`encode_batch`."""
    what = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more in its batch"
    outcomes, records, _ = decode_outcome(what, data)
    if isinstance(outcomes, State):  # the batch could not be unpickled here
        return [(outcomes, 0.0)] * len(names), None
    return outcomes, records


def import_engine(module: str, runner: str) -> Any:
    """Import the engine a runner needs, on first use (``import taskrunners`` does not).

    :raises RuntimeError: naming the runner and the package to install
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(f"Using the `{runner}` requires `{module}` to be installed.") from exc
