"""Free loopback ports for the test bed (127.0.0.1 only).

The kernel picks a free ephemeral port (bind to port 0); we remember every port handed out
in this process so that two servers of one test never get the same one, and check that the
port is free for both TCP and UDP (pebble-challtestsrv's DNS server binds both).

Under pytest-xdist (``-n N``) the workers are separate processes that cannot see each
other's list: each worker takes its ports from its own block of a range below the kernel's
ephemeral ports instead (worker ``gwK`` of N: block K of 20000-32767), so two workers never
pick the same port between one's check and its server's bind.
"""
from __future__ import annotations

import os
import re
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


def _range() -> tuple[int, int]:
    """20000-32767, or ``$CERTBOT_BATCH_PORT_RANGE`` ("LOW-HIGH", inclusive): two test runs
    on one machine (two checkouts) each take their own range."""
    spec = os.environ.get("CERTBOT_BATCH_PORT_RANGE", "")
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec)
    if match and int(match.group(1)) < int(match.group(2)):
        return int(match.group(1)), int(match.group(2)) + 1
    return 20000, 32768


_RANGE = _range()
_next_port = 0  # the next candidate in this worker's block (0: its start)


def _worker_block() -> tuple[int, int] | None:
    """This xdist worker's block of ports, or None outside xdist."""
    worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    if worker is None:
        return _RANGE if os.environ.get("CERTBOT_BATCH_PORT_RANGE") else None
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), 1)
    index = int(worker.group(1)) % count
    size = (_RANGE[1] - _RANGE[0]) // count
    return _RANGE[0] + index * size, _RANGE[0] + (index + 1) * size


def _from_block(block: tuple[int, int], udp_too: bool) -> int:
    """The next port of the block that is free now; after the end of the block, from its
    start again (servers of earlier tests are gone by then; a port still taken is skipped)."""
    global _next_port
    low, high = block
    port = _next_port or low
    for _ in range(high - low):
        if port >= high:
            port = low
            _handed_out.clear()
        candidate, port = port, port + 1
        if candidate in _handed_out or not _free_for(candidate, socket.SOCK_STREAM):
            continue
        if udp_too and not _free_for(candidate, socket.SOCK_DGRAM):
            continue
        _next_port = port
        _handed_out.add(candidate)
        return candidate
    raise RuntimeError(f"no free loopback port in {low}-{high - 1}")


def free_port(udp_too: bool = False) -> int:
    """A loopback port that nothing listens on right now (and that we have not handed out)."""
    with _lock:
        block = _worker_block()
        if block is not None:
            return _from_block(block, udp_too)
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
