"""Free loopback ports for the test bed (127.0.0.1 only).

The kernel picks a free ephemeral port (bind to port 0); we remember every port handed out
in this process so that two servers of one test never get the same one, and check that the
port is free for both TCP and UDP (pebble-challtestsrv's DNS server binds both).
"""
from __future__ import annotations

import socket
import threading

LOOPBACK = "127.0.0.1"

_lock = threading.Lock()
_handed_out: set[int] = set()


def _free_for(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(udp_too: bool = False) -> int:
    """A loopback port that nothing listens on right now (and that we have not handed out)."""
    with _lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port = int(sock.getsockname()[1])
            if port in _handed_out:
                continue
            if udp_too and not _free_for(port, socket.SOCK_DGRAM):
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find a free loopback port")


def free_ports(count: int, udp_too: bool = False) -> list[int]:
    return [free_port(udp_too=udp_too) for _ in range(count)]


def is_listening(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
