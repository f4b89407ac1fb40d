"""Ports and listening sockets, for the tests of what the runners expose."""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, List, Optional, Tuple

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(pids: Optional[Iterable[int]] = None) -> List[Tuple[int, str, int]]:
    """(pid, ip, port) of every listening socket of this process and its descendants
    (or of the processes ``pids``)."""
    if pids is None:
        me = psutil.Process()
        processes = [me, *me.children(recursive=True)]
    else:
        processes = [psutil.Process(pid) for pid in pids]
    found = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                found.append((process.pid, connection.laddr.ip, connection.laddr.port))
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    # A dual-stack socket bound to 127.0.0.1 is listed as ::ffff:127.0.0.1.
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback
