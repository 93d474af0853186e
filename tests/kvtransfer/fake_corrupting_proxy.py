"""FakeCorruptingProxy: a man-in-the-middle on the KV channel that replaces chunk
payloads with noise in flight. A fake at the network boundary, for negative controls.

mode="noise": payload replaced, checksum left as the sender computed it (a
corrupted link); the receiver must detect it.
mode="noise_valid_crc": payload replaced and its checksum recomputed (an attacker
or a bug upstream of the checksum); proves the decode engine really uses the
bytes it receives, because its output changes.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import torch

from pdserve.kvtransfer import framing
from pdserve.kvtransfer.receiver import SERVICE
from pdserve.proto import kvtransfer_pb2 as pb


class FakeCorruptingProxy:
    def __init__(self, upstream: str, mode: str = "noise"):
        assert mode in ("noise", "noise_valid_crc")
        self.upstream, self.mode = upstream, mode
        self.corrupted_chunks = 0
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.address

    async def _start(self) -> None:
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self._channel = grpc.aio.insecure_channel(self.upstream, options=opts)
        self._server = grpc.aio.server(options=opts)
        handlers = {
            "Handshake": grpc.unary_unary_rpc_method_handler(self._handshake),
            "Push": grpc.stream_unary_rpc_method_handler(self._push),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        await self._server.start()

    async def _handshake(self, raw: bytes, ctx) -> bytes:
        call = self._channel.unary_unary(f"/{SERVICE}/Handshake")
        try:
            return await call(raw, metadata=ctx.invocation_metadata())
        except grpc.aio.AioRpcError as exc:
            await ctx.abort(exc.code(), exc.details())

    def _corrupt(self, raw: bytes) -> bytes:
        header, payload = framing.decode(raw)
        if header.WhichOneof("kind") != "chunk":
            return raw
        # Finite Gaussian values, like real KV: random bytes would include NaN/Inf
        # bit patterns that outlive the request in reused cache blocks.
        values = torch.randn(-(-payload.nbytes // 4), dtype=torch.float32)
        noise = memoryview(values.numpy()).cast("B")[: payload.nbytes]
        if self.mode == "noise_valid_crc":
            header.chunk.crc32c = framing.checksum([noise])
        self.corrupted_chunks += 1
        return framing.encode(pb.KVFrame(chunk=header.chunk), [noise])

    async def _push(self, frames, ctx) -> bytes:
        async def forward():
            async for raw in frames:
                yield self._corrupt(raw)

        call = self._channel.stream_unary(f"/{SERVICE}/Push")
        try:
            return await call(forward(), metadata=ctx.invocation_metadata())
        except grpc.aio.AioRpcError as exc:
            await ctx.abort(exc.code(), exc.details())

    def stop(self) -> None:
        async def _stop():
            await self._server.stop(0)
            await self._channel.close()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
