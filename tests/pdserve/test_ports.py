"""Ports named in advance: a server takes the first one of its range that nothing holds."""

from __future__ import annotations

import socket

import pytest

from pdserve.ports import first_free_port, free_port


def test_first_free_port_skips_a_port_another_socket_holds():
    first = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        assert first_free_port("127.0.0.1", first, 2) != first


def test_first_free_port_fails_naming_the_range_when_every_port_is_held():
    first = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        with pytest.raises(OSError, match=f"{first}..{first}"):
            first_free_port("127.0.0.1", first, 1)
