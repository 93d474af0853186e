"""Picking a port for a server this process is about to start."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on `host` (for a KV receiver's or a server's address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
