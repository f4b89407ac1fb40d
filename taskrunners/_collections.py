"""Walking the collections a call's arguments may nest futures in."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterator

_SCALARS = (str, bytes, int, float, bool, complex, type(None))


def visit_collection(expr: Any, visit: Callable[[Any], Any]) -> Any:
    """Rebuild ``expr`` with ``visit`` applied to every value inside it.

    Lists, tuples (named ones too), sets, frozensets, dicts (keys and values) and
    dataclass instances are walked; anything else is passed to ``visit`` whole, and
    what it returns takes its place. Containers that come back unchanged are reused,
    not copied.
    """
    result = visit(expr)
    if result is not expr:
        return result
    kind = type(expr)
    if kind in _SCALARS:
        return expr
    if kind is dict or isinstance(expr, dict):
        changed = False
        items = []
        for key, value in expr.items():
            new_key = visit_collection(key, visit)
            new_value = visit_collection(value, visit)
            changed = changed or new_key is not key or new_value is not value
            items.append((new_key, new_value))
        if not changed:
            return expr
        try:
            return kind(items)
        except TypeError:
            return dict(items)
    if isinstance(expr, (list, tuple, set, frozenset)):
        values = [visit_collection(value, visit) for value in expr]
        if all(new is old for new, old in zip(values, expr)):
            return expr
        if isinstance(expr, tuple) and hasattr(expr, "_fields"):
            return kind(*values)
        try:
            return kind(values)
        except TypeError:  # a subclass with its own constructor: fall back to the builtin
            builtin = next(b for b in (list, tuple, set, frozenset) if isinstance(expr, b))
            return builtin(values)
    if dataclasses.is_dataclass(expr) and not isinstance(expr, type):
        changes = {}
        for field in dataclasses.fields(expr):
            old = getattr(expr, field.name)
            new = visit_collection(old, visit)
            if new is not old:
                changes[field.name] = new
        if not changes:
            return expr
        if all(field.init for field in dataclasses.fields(expr)):
            return dataclasses.replace(expr, **changes)
        duplicate = copy.copy(expr)
        for name, value in changes.items():
            object.__setattr__(duplicate, name, value)
        return duplicate
    return expr


def iter_leaves(expr: Any, is_leaf: Callable[[Any], bool]) -> Iterator[Any]:
    """Yield every value inside ``expr`` for which ``is_leaf`` is true, walking as above."""
    if is_leaf(expr):
        yield expr
        return
    kind = type(expr)
    if kind in _SCALARS:
        return
    if isinstance(expr, dict):
        for key, value in expr.items():
            yield from iter_leaves(key, is_leaf)
            yield from iter_leaves(value, is_leaf)
    elif isinstance(expr, (list, tuple, set, frozenset)):
        for value in expr:
            yield from iter_leaves(value, is_leaf)
    elif dataclasses.is_dataclass(expr) and not isinstance(expr, type):
        for field in dataclasses.fields(expr):
            yield from iter_leaves(getattr(expr, field.name), is_leaf)
