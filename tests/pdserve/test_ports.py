"""Ports for servers: picked where no port-0 socket can take them first, or named in advance (a
server takes the first one of its range that nothing holds)."""

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


def test_first_free_port_for_several_ranks_takes_the_first_run_of_free_ports_inside_the_range():
    first = free_port(count=4)
    with socket.socket() as held:
        held.bind(("127.0.0.1", first + 1))
        held.listen()
        assert first_free_port("127.0.0.1", first, 4, ranks=2) == first + 2  # first, first + 1 is broken
        with pytest.raises(OSError, match="no 3 free ports in a row"):
            first_free_port("127.0.0.1", first, 4, ranks=3)  # first + 2..first + 4 would run past the range


def test_free_ports_lie_below_the_ephemeral_range_where_port_0_sockets_land():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(20000 <= p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # and free


def test_free_port_with_a_count_gives_that_many_free_ports_in_a_row():
    first = free_port(count=3)
    socks = [socket.socket() for _ in range(3)]
    try:
        for i, s in enumerate(socks):
            s.bind(("127.0.0.1", first + i))  # each rank of a 3-rank receiver can listen
    finally:
        for s in socks:
            s.close()
