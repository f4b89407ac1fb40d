"""Telling a loopback address apart, for the runners that start their own services."""

from __future__ import annotations

import ipaddress
from typing import Optional

__all__ = ["is_loopback"]


def is_loopback(host: Optional[str]) -> bool:
    """Whether ``host`` names this machine only: ``localhost`` or a loopback IP.

    Also takes ``scheme://host``, ``host:port`` and ``[ipv6]:port``.
    """
    if not host:
        return False
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
