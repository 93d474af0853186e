"""The ingress replica's own HTTP server: the OpenAI API without Ray Serve's proxy in front.

Through the proxy a request crosses one more process, and every message of its answer is one
more Ray call: on the project's 2-core machine the HTTP side of a short prompt's TTFT was 15-26 ms
median through the proxy and 5-8 ms from this server. It runs the same app in the replica's own
event loop, next to the gRPC server; the proxy's port keeps serving alongside it.
A client that goes away ends its request here as it does through the proxy: the handler is
cancelled, so its engine request is aborted rather than left to finish for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.responses import PlainTextResponse

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
"""How long a stopping replica lets requests in flight finish (the gRPC server's grace too)."""


class _ReplicaServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process and its signals are Ray's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class CancelOnDisconnect:
    """ASGI middleware: cancel a request's handler once its client has gone. Starlette stops a
    streamed answer by itself; a whole answer would otherwise be generated to the end."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read, answered, gone = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def watched_receive() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def watched_send(message: dict) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered.set()

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not answered.is_set():  # uvicorn says "disconnect" after a complete answer too
                gone.set()

        handler = asyncio.ensure_future(self.app(scope, watched_receive, watched_send))
        watcher = asyncio.ensure_future(watch())
        client_gone = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait([handler, client_gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            client_gone.cancel()
            if not handler.done():
                handler.cancel()
                if gone.is_set():
                    log.info("client %s went away: %s %s cancelled", scope.get("client"), scope["method"],
                             scope["path"])
                await asyncio.wait([handler])  # its cleanup (aborting the engine request) runs to the end
        if not handler.cancelled():
            handler.result()  # the app's own failure, for uvicorn to answer 500


class UnderPrefix:
    """ASGI middleware: the app under the application's route prefix, as Serve's proxy mounts it
    (the prefix goes to `root_path`, where the app's routes and FrontDoor look for it); a path
    outside it is not found."""

    def __init__(self, app: Any, prefix: str):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.prefix:
            path = scope["path"]
            if path != self.prefix and not path.startswith(self.prefix + "/"):
                await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
                return
            scope = {**scope, "root_path": self.prefix}
        await self.app(scope, receive, send)


class DirectHTTP:
    """A running server; `stop()` lets requests in flight finish for up to SHUTDOWN_GRACE_S."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, address: str):
        self.server, self.task, self.address = server, task, address

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def start_direct_http(app: Any, host: str, port: int, prefix: str) -> DirectHTTP:
    """Serve `app` on host:port from this event loop, under `prefix` (the application's route
    prefix, so that URLs are the proxy's). Fails, naming the address, when the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a replica restarting on its port
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"the ingress cannot serve HTTP on {host}:{port}: {exc}") from exc
    config = uvicorn.Config(CancelOnDisconnect(UnderPrefix(app, prefix)), lifespan="off", access_log=False,
                            log_config=None, log_level=None, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    server = _ReplicaServer(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises why it stopped
            raise RuntimeError(f"the ingress's HTTP server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    address = f"{host}:{sock.getsockname()[1]}"
    log.info("ingress serving HTTP on %s", address)
    return DirectHTTP(server, task, address)
