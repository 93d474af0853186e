"""The ingress routes over the controller's routing channel when it can, and through Serve's handle
whenever it cannot: no secret, no channel, a channel that breaks mid-call (the controller
restarting), or a peer answering what no controller would. Many calls share one connection, each
answered with its own decision; after a break the channel's address is asked anew."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest
from pdserve.controller.route_server import RouteServer
from pdserve.controller.route_wire import frame, read_frame
from pdserve.deployments import route_channel
from pdserve.deployments.route_channel import RouteCallError, RouteChannel
from tests.deployments.fake_serve_handles import FakeRemoteMethod

SECRET = "route-secret"


def _req(request_id: str) -> RouteRequest:
    return RouteRequest(request_id, 100, 10, SLO(500.0, 50.0))


class FakeControllerHandle:
    """The controller's Serve handle: `choose` answers "via handle", `route_address` where its channel listens."""

    def __init__(self, addr: str = ""):
        self.addr = addr
        self.asked_address = 0
        self.choose = FakeRemoteMethod(self._choose)
        self.route_address = FakeRemoteMethod(self._route_address)

    async def _choose(self, req: RouteRequest, resuming: bool) -> Decision:
        return Decision(Outcome.REJECTED, reason=f"{req.request_id} via handle")

    async def _route_address(self) -> str:
        self.asked_address += 1
        return self.addr


class Controller:
    """The routing behind a real channel: answers "<id> via socket"; a call named "hold" waits for `release`."""

    def __init__(self):
        self.release = asyncio.Event()

    async def choose(self, req: RouteRequest, resuming: bool) -> Decision:
        if req.request_id == "hold":
            await self.release.wait()
        if req.request_id == "boom":
            raise ValueError("no such pool")
        return Decision(Outcome.REJECTED, reason=f"{req.request_id} via socket")


def _channel(handle: FakeControllerHandle, secret: str = SECRET) -> tuple[RouteChannel, list[str]]:
    paths: list[str] = []
    return RouteChannel(handle, secret, paths.append), paths


async def test_concurrent_calls_share_one_connection_each_answered_with_its_own_decision():
    server = RouteServer(Controller().choose, SECRET)
    handle = FakeControllerHandle(await server.start("127.0.0.1"))
    channel, paths = _channel(handle)
    # Calls made before the channel is open go through the handle: none waits for the opening.
    assert (await channel.choose(_req("first"), False)).reason == "first via handle"
    assert await channel.open()
    decisions = await asyncio.gather(*(channel.choose(_req(f"r{i}"), False) for i in range(50)))
    assert [d.reason for d in decisions] == [f"r{i} via socket" for i in range(50)]
    assert paths == ["serve_handle"] + ["socket"] * 50 and handle.asked_address == 1
    await channel.close()
    await server.close()


async def test_without_a_secret_or_a_channel_every_call_goes_through_serves_handle():
    handle = FakeControllerHandle()
    channel, paths = _channel(handle, secret="")
    assert (await channel.choose(_req("r1"), False)).reason == "r1 via handle"
    assert handle.asked_address == 0 and paths == ["serve_handle"]
    channel, paths = _channel(handle)  # the controller runs none ("" address)
    assert not await channel.open()
    assert (await channel.choose(_req("r2"), False)).reason == "r2 via handle"
    assert (await channel.choose(_req("r3"), False)).reason == "r3 via handle"
    assert handle.asked_address == 1 and paths == ["serve_handle"] * 2  # not asked again at once


async def test_a_channel_broken_mid_call_serves_that_call_through_the_handle_then_reopens(monkeypatch):
    monkeypatch.setattr(route_channel, "RECONNECT_S", 1.0)
    controller = Controller()
    first = RouteServer(controller.choose, SECRET)
    handle = FakeControllerHandle(await first.start("127.0.0.1"))
    channel, paths = _channel(handle)
    assert await channel.open()
    assert (await channel.choose(_req("r1"), False)).reason == "r1 via socket"
    held = asyncio.ensure_future(channel.choose(_req("hold"), False))
    await asyncio.sleep(0.1)
    await first.close()  # the controller restarts with the call in flight
    assert (await asyncio.wait_for(held, 5)).reason == "hold via handle"
    assert (await channel.choose(_req("r2"), False)).reason == "r2 via handle"  # within RECONNECT_S
    second = RouteServer(controller.choose, SECRET)
    handle.addr = await second.start("127.0.0.1")  # the restarted controller listens elsewhere
    await asyncio.sleep(1.1)
    assert await channel.open()
    assert (await channel.choose(_req("r3"), False)).reason == "r3 via socket"
    assert paths == ["socket", "serve_handle", "serve_handle", "socket"] and handle.asked_address == 2
    await channel.close()
    await second.close()


async def test_a_routing_error_is_the_callers_and_the_channel_stays_open():
    server = RouteServer(Controller().choose, SECRET)
    handle = FakeControllerHandle(await server.start("127.0.0.1"))
    channel, paths = _channel(handle)
    assert await channel.open()
    with pytest.raises(RouteCallError, match="ValueError: no such pool"):
        await channel.choose(_req("boom"), False)
    assert (await channel.choose(_req("r1"), False)).reason == "r1 via socket" and handle.asked_address == 1
    await channel.close()
    await server.close()


@pytest.mark.parametrize("answer", [
    {"ok": False},  # refuses the secret
    {"decision": {"outcome": "routed", "prefill": "p"}},  # answers the call with what is no decision
    {"id": [0], "decision": {}},  # with an id that is no id
], ids=["refused", "no_decision", "unhashable_id"])
async def test_a_peer_answering_what_no_controller_would_sends_routing_through_the_handle(answer):
    async def fake_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(frame({"ok": answer.get("ok", True)}))
        call = await read_frame(reader)
        writer.write(frame({"id": call["id"], **answer}))
        await asyncio.sleep(5)

    peer = await asyncio.start_server(fake_peer, "127.0.0.1", 0)
    handle = FakeControllerHandle(f"127.0.0.1:{peer.sockets[0].getsockname()[1]}")
    channel, paths = _channel(handle)
    await channel.open()
    assert (await asyncio.wait_for(channel.choose(_req("r1"), False), 5)).reason == "r1 via handle"
    assert paths == ["serve_handle"]
    await channel.close()
    peer.close()
