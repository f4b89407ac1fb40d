"""Ray itself, as the Ray runner reaches it: the lazy import and every private Ray name.

Each private name sits behind one small function here, with a fallback for a Ray
that no longer has it. :data:`PRIVATE_NAMES` lists them and :func:`required` says
which the installed Ray still has; ``tests/test_ray.py`` fails, naming the
function, when one is gone. Checked against Ray 2.60.0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import inspect
import os
from typing import Any, Callable, Dict, FrozenSet, Iterator, Mapping, NamedTuple, Optional

from taskrunners._core.remote.protocol import import_engine

__all__ = [
    "import_ray",
    "on_ref_done",
    "dashboard_url",
    "enable_token_auth_if_available",
    "without_cluster_mode",
    "node_address_kwargs",
    "init_hidden_keywords",
    "PRIVATE_NAMES",
    "required",
]


def import_ray() -> Any:
    """The ``ray`` module; ``import taskrunners`` does not import it.

    :raises RuntimeError: if Ray is not installed
    """
    return import_engine("ray", "RayTaskRunner")


def _private(module: str, name: str) -> Any:
    """``module.name`` of the installed Ray, or None if it has no such thing."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _find_on_completed() -> Any:
    return getattr(import_ray().ObjectRef, "_on_completed", None)


def _find_dashboard_url() -> Any:
    return _private("ray._private.worker", "get_dashboard_url")


def _find_token_setup() -> Any:
    return _private(
        "ray._private.authentication.authentication_token_setup",
        "maybe_enable_token_auth_if_token_available",
    )


def _find_constants() -> Any:
    try:
        constants = importlib.import_module("ray._private.ray_constants")
    except ImportError:
        return None
    return constants if hasattr(constants, "ENABLE_RAY_CLUSTER") else None


def _find_init_code() -> Any:
    return getattr(inspect.unwrap(import_ray().init), "__code__", None)


def _find_node_address() -> Any:
    # ray.init takes it from **kwargs: its name is a constant of ray.init's code.
    code = _find_init_code()
    return True if code is not None and "_node_ip_address" in code.co_consts else None


def on_ref_done(ref: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback`` with the value of ``ref``, or the exception Ray gives instead.

    It runs on a Ray thread once the task is done (at once if it is).
    """
    on_completed = getattr(ref, "_on_completed", None)
    if on_completed is not None:
        # What ObjectRef.future() builds on, without a second Future per call.
        on_completed(callback)
    else:
        ref.future().add_done_callback(lambda done: callback(_outcome(done)))


def _outcome(future: concurrent.futures.Future) -> Any:
    try:
        return future.result()
    except BaseException as exc:
        return exc


def dashboard_url() -> Optional[str]:
    """The dashboard address of the Ray this process is connected to, if Ray says."""
    get_dashboard_url = _find_dashboard_url()
    if get_dashboard_url is None:
        return None
    try:
        return get_dashboard_url() or None
    except Exception:
        return None


def enable_token_auth_if_available() -> None:
    """Send Ray's authentication token to the clusters this process connects to, if one exists.

    Ray authenticates to clusters it finds by itself, but not to an explicit address,
    so a token-protected head would refuse us (after a long retry loop). This sets
    ``RAY_AUTH_MODE=token`` for the whole process, as ``ray.init`` does for a local
    instance, and only if a token exists; a cluster without authentication ignores it.
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    setup = _find_token_setup()
    if setup is None:  # a Ray without token authentication
        return
    setup(warn_if_disabled=False)


@contextlib.contextmanager
def without_cluster_mode() -> Iterator[None]:
    """Ray's single-machine mode for the ``ray.init`` inside the block.

    Ray reads the switch during ``ray.init`` (its environment variable only when
    ``ray`` is imported), so it is flipped for that call only. Without it (fallback)
    Ray keeps its platform's mode.
    """
    constants = _find_constants()
    if constants is None or not constants.ENABLE_RAY_CLUSTER:
        yield
        return
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = True


def node_address_kwargs(host: str) -> Dict[str, Any]:
    """The ``ray.init`` keyword that puts a new local node on ``host``, if Ray has it.

    Without it (fallback) Ray chooses the node's address itself.
    """
    return {"_node_ip_address": host} if _find_node_address() is not None else {}


def init_hidden_keywords() -> Optional[FrozenSet[str]]:
    """The names ``ray.init`` may take through its ``**kwargs`` (its hidden options,
    such as ``_temp_dir``): every name-like string constant of its code, a superset.

    None if its code cannot be read: the caller then lets every key through.
    """
    code = _find_init_code()
    if code is None:
        return None
    return frozenset(
        const for const in code.co_consts if isinstance(const, str) and const.isidentifier()
    )


class PrivateName(NamedTuple):
    """A private Ray name a function of this module relies on."""

    name: str
    #: Its object in the installed Ray, or None if the installed Ray has no such thing.
    find: Callable[[], Any]


#: The function of this module each private Ray name is used by.
PRIVATE_NAMES: Mapping[str, PrivateName] = {
    "on_ref_done": PrivateName("ray.ObjectRef._on_completed", _find_on_completed),
    "dashboard_url": PrivateName("ray._private.worker.get_dashboard_url", _find_dashboard_url),
    "enable_token_auth_if_available": PrivateName(
        "ray._private.authentication.authentication_token_setup"
        ".maybe_enable_token_auth_if_token_available",
        _find_token_setup,
    ),
    "without_cluster_mode": PrivateName(
        "ray._private.ray_constants.ENABLE_RAY_CLUSTER", _find_constants
    ),
    "node_address_kwargs": PrivateName("ray.init(_node_ip_address=...)", _find_node_address),
    "init_hidden_keywords": PrivateName("ray.init.__code__", _find_init_code),
}


def required() -> Dict[str, bool]:
    """For each function of :data:`PRIVATE_NAMES`: whether the installed Ray has its name.

    :raises RuntimeError: if Ray is not installed
    """
    return {function: private.find() is not None for function, private in PRIVATE_NAMES.items()}
