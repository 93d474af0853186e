"""The HTTP API's front door: no key, no byte of the body read; a body over the limit is refused
from its Content-Length alone, or read no further than the limit when it has none. Driven at the
ASGI level, so the test sees exactly what the app pulled from the connection."""

from __future__ import annotations

import json

import pytest

from pdserve.deployments.api.http_api import build_http_app
from tests.deployments.test_api_keys import KEY, FakeKeyedFrontend

LIMIT = FakeKeyedFrontend.max_body_bytes
CHUNK = 16 << 10


class FakeConnection:
    """A client's side of one HTTP request: `body_bytes` of body (JSON-looking garbage) in
    CHUNK-sized messages, counting what the server reads, and the answer it sends back."""

    def __init__(self, body_bytes: int):
        self.left = body_bytes
        self.read_bytes = 0
        self.reads = 0
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        self.reads += 1
        n = min(CHUNK, self.left)
        self.left -= n
        self.read_bytes += n
        return {"type": "http.request", "body": b"{" * n, "more_body": self.left > 0}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def error(self) -> dict:
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return json.loads(body)["error"]


async def post(body_bytes: int, key: str | None, declare_length: bool = True,
               path: str = "/v1/chat/completions") -> FakeConnection:
    conn = FakeConnection(body_bytes)
    headers = [(b"content-type", b"application/json")]
    if declare_length:
        headers.append((b"content-length", str(body_bytes).encode()))
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    await build_http_app(FakeKeyedFrontend)(scope, conn.receive, conn.send)
    return conn


@pytest.mark.parametrize("declare_length", [True, False], ids=["content_length", "chunked"])
@pytest.mark.parametrize("key", [None, "sk-wrong-123"], ids=["no_key", "wrong_key"])
async def test_a_body_far_over_the_limit_without_a_valid_key_is_401_with_nothing_read(key, declare_length):
    conn = await post(64 * LIMIT, key, declare_length)
    assert conn.status == 401 and conn.error["code"] == "invalid_api_key"
    assert conn.reads == 0


async def test_a_malformed_body_without_a_key_is_401_not_400():
    conn = await post(100, None)
    assert conn.status == 401 and conn.reads == 0


async def test_with_a_key_a_declared_length_over_the_limit_is_413_with_nothing_read():
    conn = await post(64 * LIMIT, KEY)
    assert conn.status == 413 and conn.error["code"] == "request_too_large" and str(LIMIT) in conn.error["message"]
    assert conn.reads == 0


async def test_with_a_key_a_body_without_a_length_is_read_no_further_than_the_limit():
    conn = await post(64 * LIMIT, KEY, declare_length=False)
    assert conn.status == 413 and conn.error["code"] == "request_too_large"
    assert LIMIT < conn.read_bytes <= LIMIT + CHUNK


async def test_with_a_key_a_body_within_the_limit_reaches_the_api():
    conn = await post(100, KEY)  # read whole, then refused by the API as the invalid JSON it is
    assert conn.status == 400 and "not valid JSON" in conn.error["message"] and conn.read_bytes == 100


async def test_a_content_length_that_is_not_a_number_is_400():
    conn = FakeConnection(10)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-length", b"-5")]}
    await build_http_app(FakeKeyedFrontend)(scope, conn.receive, conn.send)
    assert conn.status == 400 and conn.reads == 0


async def test_open_paths_need_no_key_under_a_route_prefix_and_other_paths_do():
    conn = FakeConnection(0)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "method": "GET", "scheme": "http", "path": "/team/metrics",
             "raw_path": b"/team/metrics", "root_path": "/team", "query_string": b"", "headers": []}
    await build_http_app(FakeKeyedFrontend)(scope, conn.receive, conn.send)
    assert conn.status == 200
    assert (await post(0, None, path="/v1/no-such-route")).status == 401
