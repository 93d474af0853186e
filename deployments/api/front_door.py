"""What the HTTP API checks before any of a request's body is read: the API key, then the
body's size. FastAPI reads and parses a whole body before its dependencies run, so both checks
sit in front of it as ASGI middleware: a client without a key, or with a body over the limit,
costs the ingress its headers only."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pdserve.deployments.api_keys import bearer_token
from pdserve.deployments.frontend import FrontendAPI
from pdserve.errors import InvalidRequest, PayloadTooLarge, ServeError

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Paths served without a key (probes, scrapers, the API's documentation); every other needs one."""


class FrontDoor:
    """ASGI middleware: 401 without a valid key and 413 over `max_body_bytes`, decided from the
    headers where they tell (a body without Content-Length is read up to the limit, no further)."""

    def __init__(self, app: Any, get_frontend: Callable[[], FrontendAPI]):
        self.app = app
        self.get_frontend = get_frontend

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            frontend = self.get_frontend()
            if _route_path(scope) not in OPEN_PATHS:
                frontend.authorize(bearer_token(headers.get("authorization")))
            limit = frontend.max_body_bytes
            if _content_length(headers) > limit:
                raise PayloadTooLarge(limit)
            body = await _read_body(receive, limit)
        except ServeError as err:
            await _answer(send, err)
            return
        await self.app(scope, _replay(body, receive), send)


def _content_length(headers: dict[str, str]) -> int:
    value = headers.get("content-length", "0").strip() or "0"
    if not value.isdigit():
        raise InvalidRequest(f"Content-Length must be a number of bytes, got {value[:20]!r}")
    return int(value)


def _route_path(scope: dict) -> str:
    """The path below the application's route prefix (Serve mounts it under `root_path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


async def _read_body(receive: Callable, limit: int) -> list[dict]:
    """The request's body messages, up to `limit` bytes; PayloadTooLarge past it, unread beyond."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            raise PayloadTooLarge(limit)
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[dict], receive: Callable) -> Callable:
    """A `receive` that gives the app the body read already, then the connection's own events."""
    pending = list(messages)

    async def replay() -> dict:
        return pending.pop(0) if pending else await receive()

    return replay


async def _answer(send: Callable, err: ServeError) -> None:
    body = json.dumps(err.openai_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    if isinstance(err, PayloadTooLarge):
        headers.append((b"connection", b"close"))  # the rest of the body stays unread
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
