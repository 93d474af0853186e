"""The ingress's side of the controller's routing channel (`controller/route_server.py`): route
requests over one authenticated socket to the controller, many in flight at once, matched to
their answers by id. Whenever the channel is off, not yet open or broken (the controller
restarting), calls go through Serve's handle as before. It is opened in the background, so no
call waits for it (a network that drops the connection attempt would hold each opening for
`CONNECT_TIMEOUT_S`); one that failed or broke is tried again after `RECONNECT_S`, its address
asked anew (a restarted controller listens elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from pdserve.config.cluster import ClusterConfig
from pdserve.controller.decision import Decision, RouteRequest
from pdserve.controller.route_wire import decision_from_wire, frame, read_frame, request_to_wire

log = logging.getLogger("pdserve.ingress")

RECONNECT_S = 5.0
"""After the channel failed to open or broke, how long calls go through Serve's handle before it is tried again."""
CONNECT_TIMEOUT_S = 2.0
"""How long opening the channel (its address, the connection, the secret's acceptance) may take."""


def route_channel_secret(cfg: ClusterConfig) -> str:
    """The secret the routing channel's connections carry ("": the channel is off)."""
    return cfg.kv_transfer.secret_value if cfg.routing.channel == "socket" else ""


class RouteCallError(RuntimeError):
    """The controller's routing raised for this request (as it would through Serve's handle)."""


class RouteChannel:
    def __init__(self, controller: Any, secret: str, counted: Callable[[str], None] = lambda path: None):
        """`controller`: the controller's Serve handle; `secret`: the cluster secret ("" keeps the
        channel off: every call goes through the handle); `counted` is told each call's path
        ("socket" or "serve_handle")."""
        self.controller = controller
        self._secret = secret
        self._counted = counted
        self._conn: _Connection | None = None
        self._opening: asyncio.Task | None = None
        self._retry_at_s = 0.0

    async def choose(self, route: RouteRequest, resuming: bool) -> Decision:
        conn = self._connection()
        if conn is not None:
            try:
                decision = await conn.call(route, resuming)
                self._counted("socket")
                return decision
            except ConnectionError as exc:
                log.warning("routing channel broke (%s): routing through Serve's handle for %.0f s", exc, RECONNECT_S)
                self._broken(conn)
        decision = await self.controller.choose.remote(route, resuming)
        self._counted("serve_handle")
        return decision

    def open_soon(self) -> None:
        """Start opening the channel (when it is on, not open and due), without waiting for it."""
        if self._conn is not None and not self._conn.closed:
            return
        if not self._secret or self._opening is not None or time.monotonic() < self._retry_at_s:
            return
        self._opening = asyncio.get_running_loop().create_task(self._open_in_background())

    async def open(self) -> bool:
        """Open the channel now (when it is on and due) and say whether it is open."""
        self.open_soon()
        if self._opening is not None:
            await asyncio.shield(self._opening)
        return self._conn is not None and not self._conn.closed

    async def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._conn is not None:
            await self._conn.close()

    def _broken(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            self._retry_at_s = time.monotonic() + RECONNECT_S

    def _connection(self) -> _Connection | None:
        """The open channel; None (and an opening started, when due) without one."""
        if self._conn is not None and self._conn.closed:
            self._broken(self._conn)
        if self._conn is None:
            self.open_soon()
        return self._conn

    async def _open_in_background(self) -> None:
        try:
            self._conn = await asyncio.wait_for(self._open(), CONNECT_TIMEOUT_S)
        except Exception as exc:  # unreachable, refused or off: Serve's handle meanwhile
            log.warning("routing channel not open (%r): routing through Serve's handle for %.0f s", exc, RECONNECT_S)
            self._retry_at_s = time.monotonic() + RECONNECT_S
        finally:
            self._opening = None

    async def _open(self) -> _Connection:
        addr = await self.controller.route_address.remote()
        if not addr:
            raise ConnectionError("the controller runs no routing channel")
        host, _, port = addr.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(frame({"secret": self._secret}))
            hello = await read_frame(reader)
            if hello.get("ok") is not True:
                raise ConnectionError(f"the routing channel answered {hello!r}")
        except BaseException:
            writer.close()
            raise
        log.info("routing channel open to %s", addr)
        return _Connection(reader, writer)


class _Connection:
    """One open channel: calls write their frame and wait for the answer with their id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self.closed = False
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def call(self, route: RouteRequest, resuming: bool) -> Decision:
        if self.closed:
            raise ConnectionError("closed")
        call_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[call_id] = answer
        try:
            self._writer.write(frame({"id": call_id, "req": request_to_wire(route), "resuming": resuming}))
            return await answer
        finally:  # answered, failed or given up by the caller: an answer arriving later is dropped
            self._pending.pop(call_id, None)

    async def close(self) -> None:
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading

    async def _read(self) -> None:
        why: BaseException = ConnectionError("closed")
        try:
            while True:
                msg = await read_frame(self._reader)
                answer = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
                if answer is None or answer.done():
                    continue
                if "error" in msg:
                    answer.set_exception(RouteCallError(str(msg["error"])))
                else:
                    answer.set_result(decision_from_wire(msg.get("decision")))
        except Exception as exc:  # the stream ended, or the peer sent what no controller would
            why = ConnectionError(f"{type(exc).__name__}: {exc}")
        finally:
            self.closed = True
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(why)
            self._writer.close()
