"""Refusing a misspelt key in the keyword arguments a runner passes on to its engine
(``cluster_kwargs``, ``client_kwargs``, ``init_kwargs``), before anything is launched.

Which keys a target takes is read from its signature; what a ``**kwargs`` passes on
is the caller's to say (see :mod:`~taskrunners._core.dask.cluster` and
:mod:`~taskrunners._core.ray.connection`). A target that takes ``**kwargs`` no one
can follow takes any key.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Collection, FrozenSet, Iterable, Tuple

__all__ = ["signature_keywords", "refuse_unknown"]

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
# A list of valid keys longer than this is left to the target's documentation.
_LISTED_AT_MOST = 30


def signature_keywords(target: Any) -> Tuple[FrozenSet[str], bool]:
    """The names ``target`` takes as keyword arguments, and whether it also takes
    ``**kwargs``; ``(frozenset(), True)`` if its signature cannot be read."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), True
    names = frozenset(parameter.name for parameter in parameters if parameter.kind in _KEYWORD_KINDS)
    open_ended = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)
    return names, open_ended


def refuse_unknown(
    argument: str,
    given: Iterable[str],
    valid: Collection[str],
    target: str,
    also_valid: Callable[[str], bool] = lambda key: False,
) -> None:
    """Refuse the keys of ``given`` that are not in ``valid`` (nor ``also_valid``).

    :param argument: the runner's argument the keys come from, e.g. "cluster_kwargs"
    :param target: what they are not taken by, e.g. "distributed.Client"
    :raises TypeError: naming ``argument``, each unknown key and the closest valid key
    """
    unknown = [key for key in given if key not in valid and not also_valid(key)]
    if not unknown:
        return
    choices = sorted(valid)
    clauses = []
    unmatched = False
    for key in unknown:
        closest = difflib.get_close_matches(key, choices, n=1) if isinstance(key, str) else []
        if closest:
            clauses.append(f"{key!r} (did you mean {closest[0]!r}?)")
        else:
            clauses.append(f"{key!r} (nothing close to it)")
            unmatched = True
    which = "a key" if len(unknown) == 1 else "keys"
    message = (
        f"`{argument}` has {which} not taken by {target}: {', '.join(clauses)}. "
        f"Correct or remove {'it' if len(unknown) == 1 else 'them'}"
    )
    if unmatched and len(choices) <= _LISTED_AT_MOST:
        message += f"; the keys taken are {', '.join(choices)}"
    raise TypeError(message + ".")
