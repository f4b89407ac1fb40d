"""The blocking DaskTaskRunner: calls run on a Dask cluster through a synchronous Client.

The path of a call: ``submit`` pickles ``run_fn`` and its arguments with cloudpickle
and hands them to Dask as one task, ``_run_on_worker``, under the key
``f"{task_run.name}-{task_run.id.hex}"`` and with a token naming that task; a worker
runs it to a State; the client's event loop gathers the States of finished calls in
batches (``_StateFetcher``) and settles their handles (``_DaskCall``).

Hazards, each with its own answer:

- Started or not. A Dask client cannot see whether a task has begun on a worker, and
  Dask cannot stop one that has. Each worker process keeps a registry of tokens: a
  call marks itself started under a lock unless a cancellation got there first, and
  a cancellation (``Client.run`` on every worker) marks the calls not started as
  cancelled under the same lock and reports the others. Only calls that no worker
  started are cancelled: a cancelled call never runs, a started call runs to its end.
- Results crossing processes. On workers outside this process a call's State is
  pickled by the worker itself, so a result that cannot be pickled becomes that
  call's Crashed state, holding the pickling error, instead of a Dask serialization
  failure logged far away.
- Logging. Records a call emits on a worker process travel back with its State and
  are handled by this process's loggers, whose levels decide what is shown. Worker
  processes of a LocalCluster import the script's ``__main__`` and so inherit its
  logging configuration; their own handlers are kept from printing a call's records
  a second time on the terminal they share with this process.
- Network exposure. LocalCluster serves its dashboard and HTTP endpoints on every
  interface by default; the runner pins every listener of a LocalCluster it creates
  to 127.0.0.1 unless the user chose a host or interface.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import functools
import importlib
import inspect
import ipaddress
import itertools
import logging
import os
import pickle
import threading
import time
import traceback
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple, Union

import cloudpickle

from taskrunners._collections import iter_leaves, visit_collection
from taskrunners._core.base import FLAT_TYPES, BlockingTaskRunner, TaskConcurrencyType, state_of_done
from taskrunners._core.calls import TIMEOUT_ERRORS, when_all_done
from taskrunners._core.running import checked_state, is_coroutine_function
from taskrunners.futures import PrefectFuture, TaskRun
from taskrunners.states import Crashed, State, exception_to_crashed_state

__all__ = ["DaskTaskRunner"]

_MISSING_DISTRIBUTED = "Using the `DaskTaskRunner` requires `distributed` to be installed."

# Each connection attempt to an existing scheduler may take this long (unless
# client_kwargs["timeout"] says otherwise); attempts repeat until connect_timeout.
_CONNECT_ATTEMPT_SECONDS = 5.0
# How long a worker process may take to stop when the block is left with an exception.
_KILL_GRACE_SECONDS = 1.0
_LOOPBACK = "127.0.0.1"
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_ABSENT: Any = object()


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


# -- where a LocalCluster listens -----------------------------------------------------


def _is_loopback(host: str) -> bool:
    host = host.split("://", 1)[-1]
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # "host:port"
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def _names_a_listening_address(kwargs: Mapping[str, Any], distributed: Any) -> bool:
    """Whether cluster kwargs choose a host or interface other than loopback."""
    scheduler_kwargs = kwargs.get("scheduler_kwargs")
    for options in (kwargs, scheduler_kwargs if isinstance(scheduler_kwargs, Mapping) else {}):
        for name in ("host", "ip"):
            host = options.get(name)
            if host and not _is_loopback(str(host)):
                return True
        interface = options.get("interface")
        if interface:
            try:
                if not _is_loopback(distributed.utils.get_ip_interface(interface)):
                    return True
            except Exception:  # Dask will say what is wrong with it
                return True
    return False


def _accepted_keywords(cluster_class: Any, names: Iterable[str]) -> Set[str]:
    names = set(names)
    try:
        parameters = inspect.signature(cluster_class).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass them and see
        return names
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return names
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {parameter.name for parameter in parameters if parameter.kind in keywords} & names


# -- the worker side ----------------------------------------------------------------


class _Upstream:
    """Stands in a call's arguments for the State of an upstream call handed to Dask."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> Any:
        return (_Upstream, (self.index,))


class _CrashedOnWorker(Exception):
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


# The calls of this worker process, by token (one per Dask task the runner creates):
# those started and not finished (None, or (loop, task) for a coroutine call, which
# can be cancelled where it awaits), and, for the last few thousand calls, those
# finished and those cancelled before they started. A cancellation may reach a worker
# before its task does, and a finished call's State may still be on its way back.
_registry_lock = threading.Lock()
_running: Dict[str, Any] = {}
_finished_tokens: "collections.OrderedDict[str, None]" = collections.OrderedDict()
_cancelled_tokens: "collections.OrderedDict[str, None]" = collections.OrderedDict()
_REMEMBERED_TOKENS = 10_000


def _remember(tokens: "collections.OrderedDict[str, None]", token: str) -> None:
    tokens[token] = None
    if len(tokens) > _REMEMBERED_TOKENS:
        tokens.popitem(last=False)


def _mark_started(token: str) -> bool:
    """Mark the call started here; False if it was cancelled first (do not run it)."""
    with _registry_lock:
        if token in _cancelled_tokens:
            return False
        _running[token] = None
        return True


def _mark_finished(token: str) -> None:
    with _registry_lock:
        _running.pop(token, None)
        _remember(_finished_tokens, token)


def _started_here(token: str) -> bool:
    return token in _running or token in _finished_tokens


def _started_calls(tokens: List[str]) -> List[str]:
    """Run on workers (``Client.run``): which of these calls started here."""
    with _registry_lock:
        return [token for token in tokens if _started_here(token)]


def _cancel_unstarted_calls(tokens: List[str]) -> List[str]:
    """Run on workers (``Client.run``): no call of these that has not started here
    will start here; returns those that had started here."""
    started = []
    with _registry_lock:
        for token in tokens:
            if _started_here(token):
                started.append(token)
            else:
                _remember(_cancelled_tokens, token)
    return started


def _forget_cancellations(tokens: List[str]) -> None:
    """Run on workers (``Client.run``): these calls were not cancelled after all (they
    had started on another worker), so a retry of one may start here."""
    with _registry_lock:
        for token in tokens:
            _cancelled_tokens.pop(token, None)


def _abort_calls(tokens: List[str]) -> int:
    """Run on workers when the block is left with an exception: none of these calls
    starts any more, and coroutine calls running here are cancelled where they await.
    A plain call already running cannot be stopped. Returns how many were cancelled.
    """
    cancelled = 0
    with _registry_lock:
        for token in tokens:
            _remember(_cancelled_tokens, token)
            running = _running.get(token)
            if running is not None:
                loop, task = running
                try:
                    loop.call_soon_threadsafe(task.cancel)
                    cancelled += 1
                except RuntimeError:  # that loop just closed
                    pass
    return cancelled


async def _await_call(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any]) -> tuple:
    try:
        return checked_state(run_fn, await run_fn(**run_kwargs)), None
    except BaseException as exc:
        return exception_to_crashed_state(exc), exc


def _run_coroutine(run_fn: Callable[..., Any], run_kwargs: Dict[str, Any], token: str) -> tuple:
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(_await_call(run_fn, run_kwargs))
        with _registry_lock:
            if token in _cancelled_tokens:  # aborted since it was marked started
                task.cancel()
            _running[token] = (loop, task)
        try:
            return loop.run_until_complete(task)
        except BaseException as exc:  # cancelled before it started
            return exception_to_crashed_state(exc), None
        finally:
            with _registry_lock:
                _running[token] = None
            loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


class _RecordCollector(logging.Handler):
    """On a worker process's root logger: keeps the records of each capturing call,
    emitted by the thread that runs it."""

    def __init__(self) -> None:
        super().__init__()
        # Thread ident -> (lowest level kept, hide from other handlers, records).
        self.calls: Dict[int, Tuple[int, bool, List[logging.LogRecord]]] = {}
        self.level_before = logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        capture = self.calls.get(record.thread)  # type: ignore[arg-type]
        if capture is not None and record.levelno >= capture[0]:
            capture[2].append(_picklable_record(record))


class _HideCapturedRecords(logging.Filter):
    """On a worker process's own handlers: a capturing call's records go to the client
    instead (the handlers are a copy of the client's, made by importing its script)."""

    def __init__(self, collector: _RecordCollector) -> None:
        super().__init__()
        self.collector = collector

    def filter(self, record: logging.LogRecord) -> bool:
        capture = self.collector.calls.get(record.thread)  # type: ignore[arg-type]
        return capture is None or not capture[1]


_capture_lock = threading.Lock()
_collector: Optional[_RecordCollector] = None
_hide: Optional[_HideCapturedRecords] = None
_formatter = logging.Formatter()


def _picklable_record(record: logging.LogRecord) -> logging.LogRecord:
    prepared = copy.copy(record)
    prepared.msg = record.getMessage()
    prepared.args = None
    if record.exc_info:
        prepared.exc_text = record.exc_text or _formatter.formatException(record.exc_info)
    prepared.exc_info = None
    return prepared


_PLAIN_TYPES = (str, int, float, bool, type(None))


def _plain_record(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose extra attributes are made plain (for pickling)."""
    attributes = {
        key: value if isinstance(value, _PLAIN_TYPES) else repr(value)
        for key, value in record.__dict__.items()
    }
    return logging.makeLogRecord(attributes)


def _set_root_level(root: logging.Logger, collector: _RecordCollector) -> None:
    # While calls capture, the root logger lets through what the lowest of them keeps
    # (records below its level are never created); afterwards it is set back.
    level = collector.level_before
    if collector.calls:
        level = min(level, *(capture[0] for capture in collector.calls.values()))
    if root.level != level:
        root.setLevel(level)


def _hide_from_handlers(collector: _RecordCollector) -> None:
    global _hide
    if _hide is None:
        _hide = _HideCapturedRecords(collector)
    loggers = [logging.getLogger()]
    loggers += [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in list(logger.handlers):
            if handler is not collector and _hide not in handler.filters:
                handler.addFilter(_hide)


@contextmanager
def _captured_records(capture: Optional[Tuple[int, bool]]) -> Iterator[List[logging.LogRecord]]:
    """Collect the records the current thread emits at ``capture``'s level or above."""
    records: List[logging.LogRecord] = []
    if capture is None:
        yield records
        return
    global _collector
    level, hide = capture
    thread = threading.get_ident()
    root = logging.getLogger()
    with _capture_lock:
        collector = _collector
        if collector is None:
            collector = _collector = _RecordCollector()
        if not collector.calls:
            collector.level_before = root.level
            root.addHandler(collector)
        outer = collector.calls.get(thread)  # a call run inside a call, in its thread
        collector.calls[thread] = (level, hide, records)
        _set_root_level(root, collector)
        if hide:
            _hide_from_handlers(collector)
    try:
        yield records
    finally:
        with _capture_lock:
            if outer is None:
                del collector.calls[thread]
            else:
                collector.calls[thread] = outer
            _set_root_level(root, collector)
            if not collector.calls:
                root.removeHandler(collector)


def _sendable_error(exc: BaseException) -> BaseException:
    """``exc`` itself if it pickles, else an exception of its type with its message."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    try:
        cloudpickle.dumps(exc, _PROTOCOL)
        return exc
    except Exception:
        pass
    try:
        copied = type(exc)(str(exc))
        cloudpickle.dumps(copied, _PROTOCOL)
        return copied
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _encoded_outcome(key: str, state: State, records: List[logging.LogRecord]) -> bytes:
    """The call's State and log records, pickled to travel back from this worker."""
    outcome = (state, records or None, uuid.uuid4().hex if records else None)
    try:
        # Plain pickle is several times faster. For what only cloudpickle can send (a
        # class or function that came here by value) it fails instead of writing a
        # reference, since the name does not lead back to the same object here.
        return pickle.dumps(outcome, _PROTOCOL)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(outcome, _PROTOCOL)
    except Exception:
        pass
    try:
        cloudpickle.dumps(state, _PROTOCOL)
    except Exception as exc:
        state = Crashed(
            message=f"The State returned by task run {key!r} could not be pickled to "
            f"send it back from the Dask worker: {type(exc).__name__}: {exc}. Return only "
            "data that cloudpickle can serialize, or run the call on a threads cluster "
            "(`cluster_kwargs={'processes': False}`), whose States stay in this process.",
            data=_sendable_error(exc),
        )
    plain_records = [_plain_record(record) for record in records]
    return cloudpickle.dumps((state, plain_records or None, outcome[2]), _PROTOCOL)


def _decoded_outcome(value: Any) -> Tuple[State, Optional[List[logging.LogRecord]], Optional[str]]:
    """(State, log records, their id) from what ``_run_on_worker`` returned."""
    if not isinstance(value, bytes):
        return value, None, None
    try:
        return cloudpickle.loads(value)
    except Exception as exc:
        message = (
            f"The State of the call could not be unpickled here: {type(exc).__name__}: "
            f"{exc}. Return only data of modules this process can import."
        )
        return Crashed(message=message, data=exc), None, None


def _retries_requested(key: str) -> bool:
    try:
        import distributed

        task = distributed.get_worker().state.tasks.get(key)
    except Exception:
        return False
    return bool(task is not None and (task.annotations or {}).get("retries"))


def _call_on_worker(payload: bytes, upstream: Optional[List[Any]], token: str) -> tuple:
    """Run one call; returns its State and what it raised, if anything."""
    try:
        run_fn, run_kwargs = cloudpickle.loads(payload)
        if upstream:
            states = [_decoded_outcome(value)[0] for value in upstream]
            run_kwargs = visit_collection(
                run_kwargs,
                lambda value: states[value.index] if type(value) is _Upstream else value,
            )
    except BaseException as exc:
        return Crashed(
            message=f"The call could not be loaded on the Dask worker: {exc!r}. Make "
            "sure the modules its function and arguments need are installed there.",
            data=exc,
        ), None
    if is_coroutine_function(run_fn):
        return _run_coroutine(run_fn, run_kwargs, token)
    try:
        return checked_state(run_fn, run_fn(**run_kwargs)), None
    except BaseException as exc:
        return exception_to_crashed_state(exc), exc


def _run_on_worker(
    payload: bytes,
    key: str,
    token: str,
    upstream: Optional[List[Any]],
    capture: Optional[Tuple[int, bool]],
) -> Any:
    """What Dask runs: one call, to its State.

    With ``capture`` (workers outside the client's process: the lowest log level to
    keep, and whether to hide the records from this process's handlers) the value is
    the State and the call's log records pickled here; without it, the State itself.
    """
    if not _mark_started(token):
        state = exception_to_crashed_state(concurrent.futures.CancelledError())
        return state if capture is None else _encoded_outcome(key, state, [])
    try:
        with _captured_records(capture) as records:
            state, raised = _call_on_worker(payload, upstream, token)
    finally:
        _mark_finished(token)
    outcome = state if capture is None else _encoded_outcome(key, state, records)
    if isinstance(raised, Exception) and _retries_requested(key):
        raise _CrashedOnWorker(outcome, state.message) from raised
    return outcome


# -- the client side -----------------------------------------------------------------


def _on_loop_of(client: Any) -> bool:
    """Whether this thread runs ``client``'s event loop (where it must not block)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is getattr(client.loop, "asyncio_loop", None)


def _emit(records: Iterable[logging.LogRecord]) -> None:
    for record in records:
        logger = logging.getLogger(record.name)
        try:
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        except Exception:  # as logging does: a broken handler must not fail the call
            traceback.print_exc()


class _DaskCall(concurrent.futures.Future):
    """One call on the cluster; its result is the call's State once fetched.

    ``dask_future`` and ``token`` are None until the call is handed to Dask (it may
    wait for upstream calls of other runners first); both are replaced if the call
    is rerun. ``started`` is set once a worker reported that the call started there.
    """

    def __init__(self, runner: "DaskTaskRunner", client: Any) -> None:
        super().__init__()
        self.runner = runner
        self.client = client
        self.key: Optional[str] = None
        self.token: Optional[str] = None
        self.dask_future: Any = None
        self.started = False
        # Set, under ``handover``, once the call is to be cancelled: it is not handed
        # to Dask (again) from then on.
        self.cancelling = False
        self.handover = threading.Lock()
        # Set when upstream calls were handed to Dask: what a rerun needs.
        self.rerun: Optional[tuple] = None

    def running(self) -> bool:
        """Whether the call has started on a worker and is not done (asks the workers).

        On the Dask client's event loop thread, where the workers cannot be asked
        without blocking that loop, it is False until a worker was seen running it.
        """
        if self.done():
            return False
        return self.started or self.runner._started_on_workers(self)

    def cancel(self) -> bool:
        """Cancel the call if no worker has started it; a started call runs to its end.

        On the Dask client's event loop thread only a call not yet handed to Dask can
        be cancelled (asking the workers would block that loop); False otherwise.
        """
        if not self.done():
            self.runner._cancel_unstarted([self])
        return self.cancelled()


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
            values = await client.gather([c.dask_future for c in gatherable], asynchronous=True)
        except Exception:
            # One lost result must not take the others with it.
            for call in gatherable:
                try:
                    (value,) = await client.gather([call.dask_future], asynchronous=True)
                except Exception as exc:
                    value = Crashed(
                        message="The call's State could not be fetched from the Dask "
                        f"cluster: {exc!r}.",
                        data=exc,
                    )
                runner._settle_outcome(call, value)
            return
        for call, value in zip(gatherable, values):
            runner._settle_outcome(call, value)


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

    A LocalCluster (or subclass) the runner creates listens on 127.0.0.1 only:
    scheduler, workers, nannies, the dashboard and every HTTP endpoint, whatever
    ``processes``, ``dashboard_address`` or ``n_workers`` say. A dashboard address
    naming only a port (``":8787"``, ``8787``) is served on 127.0.0.1 at that port;
    with the dashboard off (``None``) Dask's HTTP endpoints (health, metrics) still
    listen, on a free loopback port; a threads cluster's workers serve theirs on
    loopback too (which turns on their dashboard pages). Naming a ``host``, ``ip``
    or ``interface`` off loopback, or a dashboard address with such a host, leaves
    that choice to the user. ``cluster_kwargs`` itself is kept exactly as given. A
    subclass whose ``__init__`` does not accept the keywords that pin loopback is
    created without them, with a warning.

    How calls run:

    - Each call is a Dask task with the key ``f"{task_run.name}-{task_run.id.hex}"``
      and ``pure=True``, so a task run submitted twice runs once. Upstream calls of
      this runner are handed to Dask as Dask futures: their States go from worker
      to worker without a trip through this process.
    - Function and arguments are serialized with cloudpickle, so lambdas, closures
      and modules registered for pickling by value work without being importable
      on the workers. A coroutine ``run_fn`` runs on an event loop of its own in a
      worker thread. On workers outside this process the State is pickled by the
      worker: one that cannot be pickled gives a Crashed state holding the error.
    - ``dask.annotate(...)`` (resources, priority, retries, workers, ...) around a
      submission applies to that call. With ``retries``, a ``run_fn`` that raises
      is retried by Dask; a returned State is never retried.
    - A worker that dies while running a call (killed, out of memory, ``os._exit``):
      Dask reruns the call on another worker, up to the scheduler's
      ``distributed.scheduler.allowed-failures`` setting (3 by default); after that
      the call's State is Crashed, naming the cause. Other calls, and calls that
      depend on the crashed one (they receive its Crashed State), go on normally.
    - Records a call logs on a worker process (those reaching the worker's root
      logger from the call's own thread, at or above this process's root logger
      level when the block started) travel back with its State and are handled by
      this process's loggers, once each, with their name and level; this process's
      logger levels decide what is emitted. Workers inside this process log here
      directly.
    - A call handle's ``cancel()`` cancels a call that no worker has started (it
      then never runs) and returns False for one that has (it runs to its end), as
      ``concurrent.futures`` does; ``running()`` tells whether a worker started it.
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

    _handles = ("_client", "_cluster", "_fetcher", "_tokens", "_emitted")
    _usable_after_pickling = True
    # Ids of the log records emitted lately: two calls sharing one Dask task get one
    # copy of its records each, and emit them once.
    _REMEMBERED_EMISSIONS = 1_000

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
        self.cluster_class: Optional[Callable[..., Any]] = cluster_class
        self.cluster_kwargs = cluster_kwargs
        self.adapt_kwargs = adapt_kwargs
        self.client_kwargs = client_kwargs
        self.connect_timeout = float(connect_timeout)

        self._client: Any = None
        self._cluster: Any = None
        self._fetcher: Optional[_StateFetcher] = None
        self._owns_cluster = False
        self._workers_in_process = False
        # What _run_on_worker does with log records and results (see there).
        self._capture: Optional[Tuple[int, bool]] = None
        # The host to show in the dashboard link; None to show Dask's link, and no
        # link at all when the dashboard is off.
        self._dashboard_host: Optional[str] = None
        self._dashboard_enabled = True
        # Why an unpickled runner has no client (distributed.get_client() failed).
        self._reconnect_error: Optional[str] = None
        super().__init__()

    def _init_bookkeeping(self) -> None:
        super()._init_bookkeeping()
        # The token of the Dask task each key in flight names: a call submitted under
        # a key Dask already holds shares that task, so it must share its token.
        self._tokens: Dict[str, str] = {}
        self._emitted: "collections.OrderedDict[str, None]" = collections.OrderedDict()

    @property
    def concurrency_type(self) -> TaskConcurrencyType:
        if self.cluster_kwargs.get("processes"):
            return TaskConcurrencyType.PARALLEL
        return TaskConcurrencyType.CONCURRENT

    # -- lifecycle ------------------------------------------------------------------

    def _open(self) -> None:
        distributed = _import_distributed()
        self._reconnect_error = None
        hide_worker_output = False
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
            kwargs = self._cluster_kwargs_to_use(distributed)
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
            if isinstance(cluster, distributed.LocalCluster):
                self._workers_in_process = not cluster.processes
                # Its worker processes write to this process's terminal.
                hide_worker_output = cluster.processes
            else:
                self._workers_in_process = self._has_workers_in_process(client)
        self._client = client
        self._fetcher = _StateFetcher(self, client)
        if self._workers_in_process:
            self._capture = None
        else:
            self._capture = (logging.getLogger().level, hide_worker_output)
        try:
            link = self._dashboard_link(client, distributed)
            if link:
                self.logger.info("The Dask dashboard is available at %s", link)
        except BaseException:
            self._release(abort=True)
            raise

    def _dashboard_link(self, client: Any, distributed: Any) -> Optional[str]:
        if self._cluster is None:
            return client.dashboard_link
        if not self._dashboard_enabled:
            return None
        link = client.dashboard_link
        if link and self._dashboard_host:
            # Dask builds the link from the scheduler's address, which for in-process
            # transport is this machine's IP, not the loopback the dashboard is on.
            try:
                port = self._cluster.scheduler_info["services"]["dashboard"]
                link = distributed.utils.format_dashboard_link(self._dashboard_host, port)
            except Exception:
                pass
        return link

    def _cluster_kwargs_to_use(self, distributed: Any) -> Dict[str, Any]:
        """The kwargs for the cluster: the user's, plus what keeps a LocalCluster on loopback."""
        kwargs = dict(self.cluster_kwargs)
        self._dashboard_host = None
        self._dashboard_enabled = True
        cluster_class = self.cluster_class
        if not (isinstance(cluster_class, type) and issubclass(cluster_class, distributed.LocalCluster)):
            return kwargs
        scheduler_kwargs = kwargs.get("scheduler_kwargs")
        scheduler_kwargs = dict(scheduler_kwargs) if isinstance(scheduler_kwargs, Mapping) else {}
        if "dashboard_address" in scheduler_kwargs:  # it wins over the top-level one
            dashboard = scheduler_kwargs["dashboard_address"]
        else:
            dashboard = kwargs.get("dashboard_address", _ABSENT)
        self._dashboard_enabled = dashboard is not None
        if _names_a_listening_address(kwargs, distributed):
            return kwargs
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
        if dashboard is not None and all(_is_loopback(host) for host, _ in _address_parts(on_loopback)):
            self._dashboard_host = _LOOPBACK
        worker_dashboard = kwargs.get("worker_dashboard_address")
        if worker_dashboard is not None:
            if _on_loopback(worker_dashboard) is not worker_dashboard:
                pinned["worker_dashboard_address"] = _on_loopback(worker_dashboard)
        elif not self._creates_processes(kwargs, distributed):
            pinned["worker_dashboard_address"] = f"{_LOOPBACK}:0"
        accepted = _accepted_keywords(cluster_class, pinned)
        kwargs.update((name, value) for name, value in pinned.items() if name in accepted)
        refused = sorted(set(pinned) - accepted)
        if refused:
            self.logger.warning(
                "`cluster_class` %s does not accept %s, so the runner cannot keep the "
                "cluster's HTTP servers (dashboard, health, metrics) on 127.0.0.1: they "
                "may listen on every network interface. Accept these keyword arguments "
                "(or **kwargs) in its __init__ and pass them on to LocalCluster, or set "
                "them there to loopback addresses such as '127.0.0.1:0'.",
                _qualified_name(cluster_class),
                ", ".join(f"`{name}`" for name in refused),
            )
        return kwargs

    @staticmethod
    def _creates_processes(kwargs: Mapping[str, Any], distributed: Any) -> bool:
        processes = kwargs.get("processes")
        if processes is None:
            worker_class = kwargs.get("worker_class")
            return worker_class is None or (
                isinstance(worker_class, type) and issubclass(worker_class, distributed.Nanny)
            )
        return bool(processes)

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

    def _close(self) -> None:
        self._release(abort=False)

    def _abort(self, exc: BaseException) -> None:
        client = self._client
        handed_over = []
        for call in list(self._pending):
            with call.handover:
                call.cancelling = True
                if call.dask_future is not None and not call.done():
                    handed_over.append((call.token, call.dask_future))
            # The Dask futures are cancelled below, all at once.
            concurrent.futures.Future.cancel(call)
        if handed_over and client is not None and self._client_usable(client):
            # Workers of a process cluster the runner created are stopped below;
            # other workers are told, so that a call about to start does not.
            if not (self._owns_cluster and not self._workers_in_process):
                try:
                    client.run(_abort_calls, [token for token, _ in handed_over])
                except Exception:
                    self.logger.debug("Cancelling calls on the workers failed", exc_info=True)
            try:
                client.cancel([dask_future for _, dask_future in handed_over])
            except Exception:
                self.logger.debug("Cancelling the Dask futures failed", exc_info=True)
        self._release(abort=True)

    def _release(self, abort: bool) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = self._fetcher = None
        try:
            if abort and cluster is not None and self._owns_cluster:
                self._stop_workers_now(cluster)
            if client is not None:
                client.close()
        finally:
            if cluster is not None and self._owns_cluster:
                cluster.close()
            self._tokens.clear()
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
        call = _DaskCall(self, client)
        waiting = []
        if run_kwargs and not all(type(value) in FLAT_TYPES for value in run_kwargs.values()):
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
        call = _DaskCall(self, self._client)
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
                return state_of_done(upstream_call)

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
        refused: Optional[Exception] = None
        with call.handover:
            if call.cancelling or call.done():
                return
            token = self._tokens.setdefault(key, uuid.uuid4().hex)
            try:
                with context:
                    dask_future = client.submit(
                        _run_on_worker,
                        payload,
                        key,
                        token,
                        upstream_futures or None,
                        self._capture,
                        key=key,
                        pure=True,
                    )
            except Exception as exc:
                refused = exc
                self._tokens.pop(key, None)
            else:
                call.key, call.token, call.dask_future = key, token, dask_future
        if refused is not None:
            settle(call, Crashed(message=f"Dask refused the call: {refused!r}.", data=refused))
            return
        if handed_off:
            call.rerun = (task_run, run_fn, run_kwargs, annotations, handed_off)
        fetcher = self._fetcher or self._fetcher_for(client)
        fetcher.watch(call, dask_future)

    def _fetcher_for(self, client: Any) -> _StateFetcher:
        with self._lifecycle_lock:
            if self._fetcher is None:
                self._fetcher = _StateFetcher(self, client)
            return self._fetcher

    def _forget_token(self, call: _DaskCall) -> None:
        if call.key is not None and self._tokens.get(call.key) == call.token:
            self._tokens.pop(call.key, None)

    def _settle_outcome(self, call: _DaskCall, value: Any) -> None:
        """Settle a call with what its Dask task returned (on the client's loop)."""
        state, records, records_id = _decoded_outcome(value)
        if records and records_id not in self._emitted:
            self._emitted[records_id] = None
            if len(self._emitted) > self._REMEMBERED_EMISSIONS:
                self._emitted.popitem(last=False)
            _emit(records)
        self._forget_token(call)
        call.rerun = None
        settle(call, state)

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
                with call.handover:
                    if call.cancelling:
                        return
                    self._forget_token(call)
                    call.rerun = None
                    call.dask_future = call.token = None
                upstream = [upstream_call for upstream_call, _ in handed_off]
                self._start_after(
                    upstream, call, task_run, run_fn, run_kwargs, True, annotations, True
                )
                return
        if isinstance(exc, _CrashedOnWorker):
            self._settle_outcome(call, exc.outcome)
            return
        self._forget_token(call)
        settle(call, self._failure_state(call, exc))

    def _failure_state(self, call: Any, exc: BaseException) -> State:
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

    # -- cancellation ------------------------------------------------------------------

    def _cancel_pending(self) -> None:
        self._cancel_unstarted(list(self._pending))

    def _cancel_unstarted(self, calls: Iterable[Any]) -> None:
        """Cancel each of ``calls`` that no worker has started, asking the workers once.

        A call that has started runs to its end, as in ``concurrent.futures``. On the
        Dask client's event loop thread only calls not yet handed to Dask are
        cancelled: asking the workers from there would block the loop that answers.
        """
        to_ask: Dict[Any, List[tuple]] = {}
        for call in calls:
            if type(call) is not _DaskCall or call.done() or call.started:
                continue
            with call.handover:
                dask_future, token = call.dask_future, call.token
                if dask_future is None:
                    # Waiting for upstream calls of another runner, or to be rerun:
                    # from now on it will not be handed to Dask.
                    call.cancelling = True
            if dask_future is None:
                concurrent.futures.Future.cancel(call)
            elif dask_future.status != "finished":  # finished: it ran, its State is coming
                to_ask.setdefault(call.client, []).append((call, dask_future, token))
        for client, entries in to_ask.items():
            if not _on_loop_of(client):
                self._cancel_on_workers(client, entries)

    def _cancel_on_workers(self, client: Any, entries: List[tuple]) -> None:
        try:
            answers = client.run(
                _cancel_unstarted_calls, [token for _, _, token in entries], on_error="ignore"
            )
        except Exception:
            self.logger.debug("Asking the Dask workers which calls started failed", exc_info=True)
            return
        started = set(itertools.chain.from_iterable(answers.values()))
        cancelled = []
        for call, dask_future, token in entries:
            if token in started:
                call.started = True
                continue
            with call.handover:
                # Rerun meanwhile (Dask failed it for a failed upstream, unstarted): not
                # cancelled if its new task is submitted already, as that may have started.
                if call.dask_future is not dask_future and call.dask_future is not None:
                    continue
                call.cancelling = True
            if concurrent.futures.Future.cancel(call):
                cancelled.append(dask_future)
                self._forget_token(call)
        if started:
            # The workers that had not started a started call marked it cancelled: a
            # retry of it (Dask's ``retries``, or a rerun after its worker died) must
            # still be able to start there. No answer is needed.
            client.loop.add_callback(
                client.run, _forget_cancellations, sorted(started), on_error="ignore", asynchronous=True
            )
        if cancelled:
            # Waited for: until the scheduler has released them, a task run submitted
            # again under the same key would be given the cancelled task.
            try:
                client.cancel(cancelled)
            except Exception:
                self.logger.debug("Cancelling the Dask futures failed", exc_info=True)

    def _started_on_workers(self, call: _DaskCall) -> bool:
        with call.handover:
            dask_future, token = call.dask_future, call.token
        if dask_future is None or _on_loop_of(call.client):
            return False
        if dask_future.status == "finished":
            started = True
        else:
            try:
                answers = call.client.run(_started_calls, [token], on_error="ignore")
            except Exception:
                return False
            started = any(answers.values())
        if started:
            call.started = True
        return started and not call.done()

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


def settle(call: concurrent.futures.Future, state: State) -> None:
    """Set a call's State unless it was cancelled meanwhile."""
    try:
        call.set_result(state)
    except concurrent.futures.InvalidStateError:
        pass
