"""Log records of calls run in worker processes, sent back to this process's loggers.

In the worker, :func:`captured_records` collects what the thread running a call logs
at the parent's level or above, made picklable; the records travel back with the
call's State, and :func:`emit` hands them to the loggers of the same names here,
where this process's logger levels decide what is emitted, once each.
"""

from __future__ import annotations

import copy
import logging
import threading
import traceback
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = ["captured_records", "plain_record", "emit"]


_formatter = logging.Formatter()


def _prepare(record: logging.LogRecord) -> logging.LogRecord:
    """A picklable copy of ``record``: its message as text, its traceback as text apart.

    Not ``logging.handlers.QueueHandler.prepare``, which does the rest of this: it
    appends the traceback to the message and drops ``exc_text``, so ``getMessage()``
    and the parent's formatters (one that puts the traceback in a field of its own,
    say) would see another record than the one logged here.
    """
    prepared = copy.copy(record)
    prepared.msg = prepared.message = record.getMessage()
    prepared.args = None
    if record.exc_info:
        prepared.exc_text = record.exc_text or _formatter.formatException(record.exc_info)
    prepared.exc_info = None
    return prepared


class _RecordCollector(logging.Handler):
    """On a worker's root logger: keeps the records of each capturing call, by thread."""

    def __init__(self) -> None:
        super().__init__()
        # Thread ident -> (lowest level kept, hide from other handlers, records).
        self.calls: Dict[int, Tuple[int, bool, List[logging.LogRecord]]] = {}
        self.level_before = logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        capture = self.calls.get(record.thread)  # type: ignore[arg-type]
        if capture is not None and record.levelno >= capture[0]:
            capture[2].append(_prepare(record))


class _HideCapturedRecords(logging.Filter):
    """On a worker's own handlers: a capturing call's records go to the parent instead.

    A worker that imports the parent's script gets the parent's handlers too (a
    module-level ``logging.basicConfig``): without this, each line would print twice.
    """

    def __init__(self, collector: _RecordCollector) -> None:
        super().__init__()
        self.collector = collector

    def filter(self, record: logging.LogRecord) -> bool:
        capture = self.collector.calls.get(record.thread)  # type: ignore[arg-type]
        return capture is None or not capture[1]


_capture_lock = threading.Lock()
_collector: Optional[_RecordCollector] = None
_hide: Optional[_HideCapturedRecords] = None


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
def captured_records(level: int, hide: bool = False) -> Iterator[List[logging.LogRecord]]:
    """Collect the records the current thread logs at ``level`` or above, made picklable.

    :param hide: keep them from this worker's own handlers (they print in the parent)
    """
    global _collector
    records: List[logging.LogRecord] = []
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


_PLAIN_TYPES = (str, int, float, bool, type(None))


def plain_record(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose extra attributes are made plain, so that it pickles."""
    attributes = {
        key: value if isinstance(value, _PLAIN_TYPES) else repr(value)
        for key, value in record.__dict__.items()
    }
    return logging.makeLogRecord(attributes)


def emit(records: Iterable[logging.LogRecord]) -> None:
    """Hand records from a worker to this process's loggers of the same names."""
    for record in records:
        logger = logging.getLogger(record.name)
        try:
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        except Exception:  # as logging does: a broken filter must not fail the call
            traceback.print_exc()
