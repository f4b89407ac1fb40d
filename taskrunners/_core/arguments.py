"""What a submission's arguments are checked for, and where futures may hide in them.

Every runner, the blocking twins and the async facade alike, refuses a ``run_fn``
that is not callable and ``run_kwargs`` that is not a mapping with the same errors,
and looks for upstream futures in the arguments with the same cheap test first.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Mapping

from taskrunners._core.futures import PrefectFuture

__all__ = [
    "FLAT_TYPES",
    "is_future",
    "may_hold_futures",
    "check_submission",
    "check_max_workers",
]

#: Argument types that can hold no future: the common case skips the collection walk.
FLAT_TYPES: FrozenSet[type] = frozenset({str, bytes, int, float, bool, complex, type(None)})


# What the walk for futures looks into (see taskrunners._collections), or finds.
_WALKED = (PrefectFuture, dict, list, tuple, set, frozenset)


# The answer of may_hold_futures by type, for the types seen (a few hundred at most).
_may_hold_by_type: Dict[type, bool] = dict.fromkeys(FLAT_TYPES, False)
_TYPES_KEPT = 512


def may_hold_futures(value: Any) -> bool:
    """Whether ``value`` is a future, or a collection the walk looks into (a cheap test)."""
    kind = type(value)
    known = _may_hold_by_type.get(kind)
    if known is None:
        known = issubclass(kind, _WALKED) or hasattr(kind, "__dataclass_fields__")
        if len(_may_hold_by_type) < _TYPES_KEPT:
            _may_hold_by_type[kind] = known
    return known


def is_future(value: Any) -> bool:
    return isinstance(value, PrefectFuture)


def check_max_workers(max_workers: Any) -> None:
    """:raises ValueError: unless ``max_workers`` is a positive integer or None"""
    if max_workers is not None and (
        not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1
    ):
        raise ValueError(f"`max_workers` must be a positive integer or None, got {max_workers!r}.")


def check_submission(run_fn: Any, run_kwargs: Any) -> None:
    """Refuse a ``run_fn`` that is not callable and ``run_kwargs`` that is not a mapping.

    :raises TypeError: naming the argument, its type and the fix
    """
    if not callable(run_fn):
        raise TypeError(
            f"`run_fn` must be callable, got {type(run_fn).__name__}: {run_fn!r}. Pass the "
            "function itself (e.g. `runner.submit(task_run, my_function, {...})`), not "
            "the result of calling it."
        )
    if type(run_kwargs) is not dict and not isinstance(run_kwargs, Mapping):
        raise TypeError(
            f"`run_kwargs` must be a mapping of argument names to values, got "
            f"{type(run_kwargs).__name__}: {run_kwargs!r}. Pass e.g. {{'x': 1}}, or {{}} "
            "for a run_fn that takes no arguments."
        )
