"""Picking a port for a server this process is about to start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

PICK_FROM = 20000
"""Lowest port `free_port` picks: above Ray's default worker ports (10002-19999)."""
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port that was free a moment ago on `host` (for a KV receiver's or a server's address),
    below the kernel's ephemeral range where it can: a port from that range may be handed to any
    process's port-0 socket (Ray's workers bind theirs so) between this pick and the server's bind,
    or while a server restarts on it, and the server then cannot bind it. With `count`, the
    `count` ports from it were all free (one per tensor-parallel rank of a KV receiver)."""
    low = _ephemeral_low()
    for _ in range(64):
        pick = random.randrange(PICK_FROM, low - count + 1) if low - count + 1 > PICK_FROM else 0
        if (port := _bound_run(host, pick, count)) is not None:
            return port
    raise OSError(f"no {count} free ports in a row on {host}")


def _bound_run(host: str, first: int, count: int) -> int | None:
    """`first` (or, for 0, the port the kernel picks) when it and the `count` - 1 ports after it
    could all be bound on `host` just now; None when one could not."""
    socks = [socket.socket() for _ in range(count)]
    try:
        socks[0].bind((host, first))
        first = socks[0].getsockname()[1]
        for i, s in enumerate(socks[1:], start=1):
            s.bind((host, first + i))
    except OSError:
        return None
    finally:
        for s in socks:
            s.close()
    return first


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default when it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def first_free_port(host: str, first: int, count: int, ranks: int = 1) -> int:
    """The lowest port p in [first, first + count) such that `host` can bind now p and the
    `ranks` - 1 ports after it, all in that range (one per tensor-parallel rank of a KV receiver),
    for servers that must listen on ports named in advance (a NetworkPolicy's). Probed without
    SO_REUSEPORT, as the servers bind, so a port another server holds counts as taken."""
    for port in range(first, first + count - ranks + 1):
        if _bound_run(host, port, ranks) is not None:
            return port
    raise OSError(f"no {ranks} free ports in a row in {first}..{first + count - 1} on {host}")
