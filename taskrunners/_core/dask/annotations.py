"""``dask.annotate`` for the DaskTaskRunner's submissions, and names fit for Dask keys.

A Dask task may be submitted from any thread: the submitting one (maybe inside
another call's ``dask.annotate`` block), the client's loop, a waiting one. A task the
dispatcher sends is submitted in a fresh context with exactly its calls' annotations.
"""

from __future__ import annotations

import contextvars
import re
from typing import Any, Callable, Dict, Hashable, Optional

__all__ = ["submit_annotated", "task_name", "frozen"]


def submit_annotated(
    annotations: Optional[Dict[str, Any]], submit: Callable[[], Any], exact: bool = False
) -> Any:
    """``submit()`` inside ``dask.annotate(**annotations)``.

    :param exact: whether to leave out the annotations of the calling thread's own
        ``dask.annotate`` blocks (the submission then runs in a fresh context, unless
        those are the same)
    """
    if exact:
        import dask

        if (dask.get_annotations() or None) != (annotations or None):
            return contextvars.Context().run(_annotated, annotations, submit)
    return _annotated(annotations, submit)


def _annotated(annotations: Optional[Dict[str, Any]], submit: Callable[[], Any]) -> Any:
    if not annotations:
        return submit()
    import dask

    with dask.annotate(**annotations):
        return submit()


def task_name(task: Any) -> str:
    """A readable name for the task of a batch, fit for a Dask key."""
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        name = getattr(task, "__name__", None)
    if not isinstance(name, str) or not name:
        name = type(task).__name__
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "task"


def frozen(value: Any) -> Hashable:
    """``value`` (annotations) as something hashable; TypeError if it cannot be."""
    if isinstance(value, dict):
        return ("dict", frozenset((key, frozen(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(frozen(item) for item in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(frozen(item) for item in value))
    hash(value)
    return value
