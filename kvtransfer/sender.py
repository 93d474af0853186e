"""Prefill-side KV sender: pushes chunks to a receiver over N gRPC streams.

The engine thread calls `send_chunk` as each layer is computed; the call
copies the blocks into a frame (the one copy on this side) and returns. A
background event loop owns the channels and streams. The forward's frames are
handed to it at the step's end (or once they reach a chunk's bytes), one
wake-up per step: waking it per layer let its thread take the GIL from the
forward at every layer. Sending then overlaps the engine's next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer import auth, framing, same_node
from pdserve.kvtransfer.fingerprint import KVFingerprint
from pdserve.kvtransfer.incoming import TransferState
from pdserve.kvtransfer.malloc_tuning import tune_malloc
from pdserve.kvtransfer.rpc import SERVICE
from pdserve.proto import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)

_CLOSE = object()
MAX_PEERS = 256
"""Receivers a sender keeps connections to; the least recently used idle ones close beyond it."""


@dataclass
class SendResult:
    transfer_id: str
    state: TransferState
    error: str
    chunks: int
    bytes: int
    elapsed_s: float


class _Peer:
    """One receiver: one HTTP/2 connection per stream, plus the epoch its handshake returned.

    Separate connections (not streams multiplexed on one) let gRPC's I/O threads
    move the streams in parallel; one shared connection serializes them.
    """

    def __init__(self, address: str, settings: KVTransferSettings):
        opts = [
            ("grpc.max_send_message_length", settings.max_frame_bytes),
            ("grpc.max_receive_message_length", 1 << 20),
            ("grpc.use_local_subchannel_pool", 1),  # do not share connections between channels
        ]
        creds = auth.channel_credentials(settings)
        self.channels = [
            grpc.aio.insecure_channel(address, options=opts)
            if creds is None
            else grpc.aio.secure_channel(address, creds, options=opts)
            for _ in range(settings.num_streams)
        ]
        self.handshake = self.channels[0].unary_unary(
            f"/{SERVICE}/Handshake",
            request_serializer=pb.HandshakeRequest.SerializeToString,
            response_deserializer=pb.HandshakeReply.FromString,
        )
        self.pushes = [
            ch.stream_unary(f"/{SERVICE}/Push", request_serializer=None, response_deserializer=pb.PushAck.FromString)
            for ch in self.channels
        ]
        self.epoch = ""
        self.link: same_node.Link | None = None  # set when the receiver is on this node
        self.lock = asyncio.Lock()
        self.active = 0  # transfers using these connections
        self.retired = False  # replaced after the peer went away; close once idle

    async def close(self) -> None:
        if self.link is not None:
            self.link.close()
        for ch in self.channels:
            await ch.close()


class OutgoingTransfer:
    """A transfer being pushed. The engine thread frames and enqueues; the sender loop streams.

    A stream starts only once it has a frame to carry (stream 0 always carries the
    end marker). A stream that carries chunks therefore opens before the transfer can
    be DONE; an empty one could otherwise arrive after the receiver finished with it.
    """

    def __init__(self, sender: "KVSender", transfer_id: str, dest: str, open_msg: pb.TransferOpen,
                 link: same_node.Link | None = None, segment: same_node.Segment | None = None):
        self.transfer_id = transfer_id
        self.dest = dest
        self._sender = sender
        self._loop = sender._loop
        self._open_msg = open_msg
        self._link, self._segment = link, segment  # same node: payloads go into the segment
        self._open_frame = b""  # framed once the handshake gave the receiver's epoch
        self._timeout_s = open_msg.lease_ms / 1000
        self._num_streams = sender.settings.num_streams
        self._next = 0
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.failed = ""
        self.finished_marked = False
        self.started_s = time.monotonic()
        self.result: concurrent.futures.Future[SendResult] = concurrent.futures.Future()
        # Frames the engine thread holds back (`send_chunk(hold=True)`), and their payload bytes.
        self._held: list[tuple[int, bytes]] = []
        self._held_bytes = 0
        # Loop-thread state, created on the loop with the first frames handed over.
        self._queues: list[asyncio.Queue] = []
        self._tasks: dict[int, asyncio.Task] = {}
        self._peer: asyncio.Future | None = None
        self._closed: asyncio.Event | None = None

    # --- engine thread ----------------------------------------------------
    def send_chunk(self, layer: int, block_start: int, num_blocks: int, parts: Sequence[memoryview],
                   hold: bool = False) -> int:
        """Frame and enqueue `num_blocks` blocks of `layer`; `parts` are views of the KV cache.
        With `hold`, the frame stays here until `flush` or `finish` (or until the held payloads
        reach a chunk's bytes): each hand-over wakes the sender loop, whose thread then takes the
        GIL from the forward at its next operation; woken at every layer, it made a 16-token
        prompt's prefill up to 1.7x a plain engine's on 2 cores. Returns the bytes copied into
        the frame (0 once the transfer has failed)."""
        if self.failed:
            return 0
        hdr = pb.KVFrame(
            chunk=pb.ChunkHeader(
                transfer_id=self.transfer_id,
                layer=layer,
                block_start=block_start,
                num_blocks=num_blocks,
                crc32c=framing.checksum(parts),
            )
        )
        payload_bytes = sum(p.nbytes for p in parts)
        if self._segment is None:
            frame = framing.encode(hdr, parts)
            copied = len(frame)
        else:
            msg = self._open_msg
            block_bytes = self._sender.fingerprint.block_bytes_per_layer
            offset = (layer * (msg.num_blocks - msg.first_block) + block_start - msg.first_block) * block_bytes
            copied = self._segment.write(offset, parts)
            frame = framing.encode(hdr)
        self.chunks_sent += 1
        self.bytes_sent += payload_bytes
        stream = self._next % self._num_streams
        self._next += 1
        self._held.append((stream, frame))
        self._held_bytes += payload_bytes
        if not hold or self._held_bytes >= self._sender.settings.chunk_bytes:
            self.flush()
        return copied

    def flush(self) -> None:
        """Hand the held frames to the sender loop, with one wake-up."""
        if self._held:
            self._loop.call_soon_threadsafe(self._deliver, self._held, False)
            self._held, self._held_bytes = [], 0

    def finish(self, compute_start_ns: int = 0, compute_end_ns: int = 0) -> None:
        """All chunks are enqueued: send them and the end marker with the totals."""
        self.finished_marked = True
        end = pb.TransferEnd(
            transfer_id=self.transfer_id,
            num_chunks=self.chunks_sent,
            total_bytes=self.bytes_sent,
            compute_start_unix_ns=compute_start_ns,
            compute_end_unix_ns=compute_end_ns,
        )
        frames = [*self._held, (0, framing.encode(pb.KVFrame(end=end)))]
        self._held, self._held_bytes = [], 0
        self._loop.call_soon_threadsafe(self._deliver, frames, True)

    def abort(self, reason: str) -> None:
        """Stop sending (the request went away); the receiver's lease cleans up its side."""
        self.failed = self.failed or reason
        self._held, self._held_bytes = [], 0
        self._loop.call_soon_threadsafe(self._deliver, [], True)

    # --- sender loop ------------------------------------------------------
    def _deliver(self, frames: list[tuple[int, bytes]], close: bool) -> None:
        """Frames handed over by the engine thread, in order; the first hand-over starts the
        transfer here (its peer's handshake), the last (`close`) ends it."""
        if self._closed is None:
            self._queues = [asyncio.Queue() for _ in range(self._num_streams)]
            self._peer = self._loop.create_future()
            self._closed = asyncio.Event()
            asyncio.ensure_future(self._run())
        for stream, frame in frames:
            self._put(stream, frame)
        if close and not self._closed.is_set():
            self._close()

    def _put(self, stream: int, frame: bytes) -> None:
        if self.failed or self._closed.is_set():
            return
        if stream not in self._tasks:
            self._tasks[stream] = asyncio.ensure_future(self._stream(stream))
        self._queues[stream].put_nowait(frame)

    def _close(self) -> None:
        """No more frames: end every started stream."""
        for q in self._queues:
            q.put_nowait(_CLOSE)
        self._closed.set()

    def _fail_fast(self, reason: str) -> None:
        """Stop copying and sending: drop queued frames and end every stream."""
        self.failed = self.failed or reason
        for q in self._queues:
            while not q.empty():
                q.get_nowait()
        self._close()

    async def _run(self) -> None:
        sender = self._sender
        state, error = TransferState.FAILED, ""
        peer: _Peer | None = None
        try:
            peer = await sender._peer(self.dest)
            peer.active += 1
            self._open_msg.epoch = peer.epoch
            self._open_frame = framing.encode(pb.KVFrame(open=self._open_msg))
            self._peer.set_result(peer)
            await self._closed.wait()  # after this no stream starts
            acks = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            errors = [a for a in acks if isinstance(a, BaseException)]
            if errors:
                raise errors[0]
            if self.failed or 0 not in self._tasks:
                raise RuntimeError(self.failed or "closed before the end marker")
            ack = self._tasks[0].result()
            state, error = TransferState(ack.state), ack.error
        except grpc.aio.AioRpcError as exc:
            error = _describe(exc)
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                sender._retire(self.dest)  # gone, or restarted (a stale epoch): handshake again next time
        except (Exception, asyncio.CancelledError) as exc:  # any failure fails this transfer only
            error = _describe(exc)
        finally:
            if peer is not None:
                peer.active -= 1
                sender._close_if_retired(peer)
            if self._link is not None:
                self._link.settle(self.transfer_id, state is TransferState.DONE)
        if state is not TransferState.DONE:
            self._fail_fast(error or state.name)
            self._peer.cancel()  # streams still waiting for the handshake give up
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            log.warning("KV transfer %s to %s failed: %s", self.transfer_id, self.dest, self.failed)
        elapsed = time.monotonic() - self.started_s
        self.result.set_result(SendResult(self.transfer_id, state, error, self.chunks_sent, self.bytes_sent, elapsed))

    async def _stream(self, index: int) -> pb.PushAck:
        q = self._queues[index]

        async def frames():
            yield self._open_frame
            while True:
                item = await q.get()
                if item is _CLOSE or self.failed:
                    return
                yield item

        try:
            peer = await self._peer
            return await peer.pushes[index](frames(), metadata=self._sender.metadata, timeout=self._timeout_s)
        except BaseException as exc:
            # One refused stream dooms the transfer: end the others now, not at the lease.
            self._fail_fast(_describe(exc))
            raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class KVSender:
    """Owns the background event loop and the connections to each receiver address."""

    def __init__(self, settings: KVTransferSettings, fingerprint: KVFingerprint, sender_id: str = ""):
        if settings.tune_malloc:
            tune_malloc()
        self.settings = settings
        self.fingerprint = fingerprint
        self.sender_id = sender_id or f"sender-{uuid.uuid4().hex[:8]}"
        self.metadata = auth.call_metadata(settings)
        self._peers: dict[str, _Peer] = {}  # least recently used first
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdserve-kv-sender", daemon=True)
        self._thread.start()

    def _call(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def open(self, transfer_id: str, dest: str, num_tokens: int, lease_ms: int, trace_parent: str = "",
             first_block: int = 0) -> OutgoingTransfer:
        """A transfer of the KV of `num_tokens` prompt tokens, blocks [first_block, end): the ones
        before are in the receiver's prefix cache already."""
        fp = self.fingerprint
        num_blocks = -(-num_tokens // fp.block_size)
        link = self._link_to(dest)
        segment = None if link is None else link.hand_over(
            transfer_id, (num_blocks - first_block) * fp.block_bytes_per_layer * fp.num_layers)
        msg = pb.TransferOpen(
            transfer_id=transfer_id,
            fingerprint=self.fingerprint.to_proto(),
            num_tokens=num_tokens,
            num_blocks=num_blocks,
            lease_ms=lease_ms,
            trace_parent=trace_parent,
            first_block=first_block,
            same_node=segment is not None,
        )
        return OutgoingTransfer(self, transfer_id, dest, msg, link if segment is not None else None, segment)

    def _link_to(self, dest: str) -> same_node.Link | None:
        """Engine thread: the same-node link to `dest` if a handshake set one up. A transfer to a
        receiver not handshaken yet goes over gRPC (its handshake runs on the loop meanwhile)."""
        peer = self._peers.get(dest)
        if peer is None or peer.retired or peer.link is None or peer.link.broken:
            return None
        return peer.link

    async def _peer(self, address: str) -> _Peer:
        peer = self._peers.pop(address, None)
        if peer is None:
            self._forget_idle_peers(MAX_PEERS - 1)
            peer = _Peer(address, self.settings)
        self._peers[address] = peer
        async with peer.lock:
            if not peer.epoch:
                reply = await peer.handshake(
                    pb.HandshakeRequest(fingerprint=self.fingerprint.to_proto(), sender_id=self.sender_id),
                    metadata=self.metadata,
                    timeout=self.settings.connect_timeout_s,
                )
                peer.epoch = reply.epoch
                if self.settings.same_node and reply.same_node_socket:
                    peer.link = await same_node.connect(
                        reply.same_node_socket, self.settings.secret_value, asyncio.get_running_loop(),
                        self.settings.same_node_pool_bytes, self.settings.connect_timeout_s)
                log.info("KV peer %s: receiver %s epoch %s%s", address, reply.receiver_id, reply.epoch[:8],
                         ", same node: payloads in shared memory" if peer.link else "")
        return peer

    def handshake(self, address: str) -> str:
        """Handshake with `address` now (fail fast on a bad secret or fingerprint); returns its epoch."""
        return self._call(self._peer(address)).result().epoch

    def _forget_idle_peers(self, keep: int) -> None:
        """Close the least recently used peers that no transfer uses until at most `keep` remain:
        decode replicas come and go, and each peer holds `num_streams` connections."""
        for address, peer in list(self._peers.items()):
            if len(self._peers) <= keep:
                return
            if peer.active == 0 and not peer.lock.locked():  # not mid-handshake either
                self._retire(address)

    def _retire(self, address: str) -> None:
        """Stop using a peer that went away; its connections close once no transfer uses them."""
        peer = self._peers.pop(address, None)
        if peer is not None:
            peer.retired = True
            self._close_if_retired(peer)

    def _close_if_retired(self, peer: _Peer) -> None:
        if peer.retired and peer.active == 0:
            asyncio.ensure_future(peer.close())

    def close(self) -> None:
        async def _close():
            for p in self._peers.values():
                await p.close()

        if self._loop.is_running():
            self._call(_close()).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
