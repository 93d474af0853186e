"""Picking a port for a server this process is about to start."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on `host` (for a KV receiver's or a server's address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def first_free_port(host: str, first: int, count: int) -> int:
    """The lowest port in [first, first + count) that `host` can bind now, for servers that must
    listen on ports named in advance (a NetworkPolicy's). Probed without SO_REUSEPORT, as the
    servers bind, so a port another server holds counts as taken."""
    for port in range(first, first + count):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {first}..{first + count - 1} on {host}")
