"""The Ray resources a call asks for: :func:`ray_options`, and whether a node can meet them.

Options given with :func:`ray_options` follow the submitting thread or async task
(a context variable); the runner reads them at submit time. A request no live node
can meet would wait in Ray forever: :class:`ResourceCheck` turns it into a Crashed
state at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from taskrunners.states import Crashed, State

__all__ = ["ray_options", "call_options", "requested_resources", "ResourceCheck"]

#: The resources of one node, as ``ray.nodes()`` gives them: ``{"CPU": 2.0, ...}``.
NodeResources = Dict[str, float]

_call_options: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "taskrunners_ray_options", default=types.MappingProxyType({})
)


def call_options() -> Mapping[str, Any]:
    """The options of the innermost :func:`ray_options` block around the caller."""
    return _call_options.get()


def _check_amount(name: str, value: Any, integer: bool = False) -> None:
    allowed = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


@contextlib.contextmanager
def ray_options(
    *,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    memory: Optional[int] = None,
    resources: Optional[Mapping[str, float]] = None,
) -> Iterator[Mapping[str, Any]]:
    """Ray resources for the calls submitted to a :class:`RayTaskRunner` inside the block.

    Options given here override the runner's ``remote_options`` for those calls; nested
    blocks override outer ones, and their ``resources`` are merged. The options follow
    the submitting thread or async task (a context variable), so concurrent tasks can
    use different options.

    :param num_cpus: CPUs each call reserves (Ray's default for a task is 1)
    :param num_gpus: GPUs each call reserves
    :param memory: bytes of memory each call reserves
    :param resources: custom resources each call reserves, e.g. ``{"accelerator": 1}``
    :return: the options in force inside the block
    :raises ValueError: for a negative or non-numeric amount, or for ``CPU``, ``GPU``
        or ``memory`` given in ``resources`` instead of their own arguments

    >>> with ray_options(num_cpus=2, resources={"big-memory": 1}) as options:
    ...     dict(options)
    {'num_cpus': 2, 'resources': {'big-memory': 1}}
    >>> from taskrunners.sync import RayTaskRunner
    >>> with RayTaskRunner().start() as runner:  # doctest: +SKIP
    ...     with ray_options(num_cpus=2, resources={"big-memory": 1}):
    ...         future = runner.submit(TaskRun(), train, {"epochs": 3})
    """
    given: Dict[str, Any] = {}
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None:
            _check_amount(name, value)
            given[name] = value
    if memory is not None:
        _check_amount("memory", memory, integer=True)
        given["memory"] = memory
    outer = _call_options.get()
    if resources is not None:
        if not isinstance(resources, Mapping):
            raise TypeError(
                f"`resources` must be a mapping of resource name to amount, got {resources!r}."
            )
        for key, value in resources.items():
            if not isinstance(key, str):
                raise TypeError(f"Resource names in `resources` must be strings, got {key!r}.")
            if key in ("CPU", "GPU", "memory"):
                argument = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}[key]
                raise ValueError(
                    f"Give {key!r} as `{argument}=`, not in `resources` ({dict(resources)!r})."
                )
            _check_amount(f"resources[{key!r}]", value)
        given["resources"] = {**outer.get("resources", {}), **resources}
    token = _call_options.set(types.MappingProxyType({**outer, **given}))
    try:
        yield _call_options.get()
    finally:
        _call_options.reset(token)


def requested_resources(options: Mapping[str, Any]) -> Dict[str, float]:
    """What one task with these remote options needs from a single node.

    >>> requested_resources({"num_cpus": 2, "resources": {"accelerator": 1}})
    {'CPU': 2, 'accelerator': 1}
    """
    request = {
        "CPU": options.get("num_cpus", 1),
        "GPU": options.get("num_gpus", 0),
        "memory": options.get("memory", 0),
        **(options.get("resources") or {}),
    }
    return {name: amount for name, amount in request.items() if amount}


def _fits(request: Mapping[str, float], capacity: List[NodeResources]) -> bool:
    return any(
        all(node.get(name, 0) >= amount for name, amount in request.items()) for node in capacity
    )


def _describe_node(node: Mapping[str, float]) -> str:
    shown = {
        name: amount
        for name, amount in node.items()
        if not name.startswith("node:") and name != "object_store_memory"
    }
    return repr(shown) if shown else "no resources"


class ResourceCheck:
    """Refuses a call whose resource request no live node of the cluster can ever meet.

    :param defaults: the runner's remote options, which per-call options override
    :param capacity: the resources of each live node, as the runner found them
    :param live_nodes: the resources of each live node now (a node may have joined)
    """

    def __init__(
        self,
        defaults: Mapping[str, Any],
        capacity: List[NodeResources],
        live_nodes: Callable[[], List[NodeResources]],
    ) -> None:
        self._defaults = defaults
        self.capacity = capacity
        self._live_nodes = live_nodes
        # The per-call options already found to fit: most calls skip the check.
        self._fitting: Set[Tuple[Tuple[str, str], ...]] = set()

    def refusal(self, options: Mapping[str, Any]) -> Optional[State]:
        """A Crashed state if no live node can meet a call with ``options``, else None."""
        key = tuple(sorted((name, repr(value)) for name, value in options.items()))
        if key in self._fitting:
            return None
        request = requested_resources({**self._defaults, **options})
        if not _fits(request, self.capacity):
            try:
                self.capacity = self._live_nodes()
            except Exception:  # the cluster cannot tell: let Ray decide
                return None
            if not _fits(request, self.capacity):
                largest = max(self.capacity, key=lambda node: node.get("CPU", 0), default={})
                error = ValueError(
                    f"No live node of the Ray cluster can meet the request {request!r}; the "
                    f"largest node has {_describe_node(largest)}. Ask for less in "
                    "`ray_options(...)` or `remote_options`, or add a node that fits."
                )
                return Crashed(message=f"The call can never be scheduled: {error}", data=error)
        self._fitting.add(key)
        return None
