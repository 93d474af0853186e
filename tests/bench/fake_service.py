"""A fake OpenAI completions server on loopback: the external boundary the load generators talk to."""

import asyncio
import json


class FakeSSEServer:
    """A minimal HTTP/1.1 server on loopback that answers /v1/completions with `events(body)`, then
    [DONE]; None answers 429. By default by prompt: "busy" gets a 429, "fail" an error event after
    its text, anything else three text events and a usage chunk."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length"))
        body = json.loads(await reader.readexactly(length))
        self.bodies.append(body)
        events = self.events(body)
        if events is None:
            msg = b'{"error": {"message": "overloaded"}}'
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for event in events:
                writer.write(f"data: {json.dumps(event)}\n\n".encode())
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    def events(self, body: dict) -> list[dict] | None:
        if body["prompt"] == "busy":
            return None
        events: list[dict] = [{"choices": [{"index": 0, "text": ""}]}]
        events += [{"choices": [{"index": 0, "text": t}]} for t in ("Hello", " wor", "ld")]
        if body["prompt"] == "fail":
            events.append({"error": {"message": "engine died"}})
        events.append({"choices": [], "usage": {"completion_tokens": 3}, "slo": {"ttft_met": True}})
        return events
