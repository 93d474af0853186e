"""The controller's routing channel answers route calls only on connections that sent the cluster
secret, and closes any connection that sends what no ingress would (a wrong secret, nothing at
all, an oversized frame, a call without an id), while serving the others. A routing error is the
caller's, not the channel's."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.controller import route_server
from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest
from pdserve.controller.route_server import RouteServer
from pdserve.controller.route_wire import decision_from_wire, frame, read_frame, request_to_wire

SECRET = "route-secret"
REQ = RouteRequest("r-1", 100, 10, SLO(500.0, 50.0))


async def _choose(req: RouteRequest, resuming: bool) -> Decision:
    if req.request_id == "boom":
        raise ValueError("no such pool")
    return Decision(Outcome.REJECTED, reason=f"{req.request_id} resuming={resuming}")


@pytest.fixture
async def server():
    s = RouteServer(_choose, SECRET)
    addr = await s.start("127.0.0.1")
    yield addr
    await s.close()


async def _connect(addr: str, secret: str | None = SECRET) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = addr.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    if secret is not None:
        writer.write(frame({"secret": secret}))
    return reader, writer


async def _call(reader, writer, call_id: int, req: RouteRequest = REQ, resuming: bool = False) -> dict:
    writer.write(frame({"id": call_id, "req": request_to_wire(req), "resuming": resuming}))
    return await asyncio.wait_for(read_frame(reader), 5)


async def _closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


async def test_calls_after_the_secret_are_answered_in_order_with_their_ids(server):
    reader, writer = await _connect(server)
    assert await read_frame(reader) == {"ok": True}
    assert decision_from_wire((await _call(reader, writer, 7))["decision"]).reason == "r-1 resuming=False"
    answer = await _call(reader, writer, 8, RouteRequest("r-2", 5, 1, SLO(1.0, 1.0)), resuming=True)
    assert answer["id"] == 8 and decision_from_wire(answer["decision"]).reason == "r-2 resuming=True"
    writer.close()


async def test_connections_beyond_the_unauthenticated_limit_are_closed_at_once_and_ingresses_still_get_in(
        monkeypatch):
    monkeypatch.setattr(route_server, "MAX_UNAUTHENTICATED", 2)
    s = RouteServer(_choose, SECRET)
    addr = await s.start("127.0.0.1")
    silent = [await _connect(addr, secret=None) for _ in range(2)]
    await asyncio.sleep(0.1)
    one_more, _ = await _connect(addr, secret=None)
    assert await _closed(one_more)
    silent[0][1].write(frame({"secret": SECRET}))  # one of them turns out to be an ingress
    assert await read_frame(silent[0][0]) == {"ok": True}
    reader, writer = await _connect(addr)  # room again for one still to authenticate
    assert await read_frame(reader) == {"ok": True} and "decision" in await _call(reader, writer, 1)
    await s.close()


async def test_a_first_frame_larger_than_a_secret_closes_the_connection_unread(server):
    reader, writer = await _connect(server, secret=None)
    writer.write((64 * 1024).to_bytes(4, "big") + b"x" * 1000)
    assert await _closed(reader)


async def test_a_wrong_secret_closes_the_connection_and_others_are_still_served(server):
    bad_reader, bad_writer = await _connect(server, "guess")
    bad_writer.write(frame({"id": 1, "req": request_to_wire(REQ)}))
    assert await _closed(bad_reader)  # no "ok", no answer
    reader, writer = await _connect(server)
    assert await read_frame(reader) == {"ok": True} and "decision" in await _call(reader, writer, 1)
    writer.close()


async def test_a_connection_that_never_sends_its_secret_is_closed(monkeypatch):
    monkeypatch.setattr(route_server, "AUTH_TIMEOUT_S", 0.2)
    s = RouteServer(_choose, SECRET)
    reader, _ = await _connect(await s.start("127.0.0.1"), secret=None)
    assert await _closed(reader)
    await s.close()


@pytest.mark.parametrize("hostile", [
    (2**31).to_bytes(4, "big"),  # a 2 GiB frame announced: refused from its length
    frame({"req": request_to_wire(REQ)}),  # no id
    frame({"id": 1, "req": {"request_id": "r"}}),  # not a route request
    frame({"id": 1, "req": request_to_wire(REQ), "resuming": "yes"}),
    b"\x00\x00\x00\x05{oops",
], ids=["oversized", "no_id", "not_a_request", "resuming_not_bool", "not_json"])
async def test_a_frame_no_ingress_sends_closes_that_connection_only(server, hostile):
    reader, writer = await _connect(server)
    assert await read_frame(reader) == {"ok": True}
    writer.write(hostile)
    assert await _closed(reader)
    reader, writer = await _connect(server)
    assert await read_frame(reader) == {"ok": True} and "decision" in await _call(reader, writer, 2)
    writer.close()


async def test_a_routing_error_answers_that_call_and_the_channel_goes_on(server):
    reader, writer = await _connect(server)
    await read_frame(reader)
    failed = await _call(reader, writer, 1, RouteRequest("boom", 1, 1, SLO(1.0, 1.0)))
    assert failed == {"id": 1, "error": "ValueError: no such pool"}
    assert "decision" in await _call(reader, writer, 2)
    writer.close()


def test_a_server_without_a_secret_is_refused():
    with pytest.raises(ValueError, match="cluster secret"):
        RouteServer(_choose, "")
