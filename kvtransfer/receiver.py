"""Decode-side KV receiver: a grpc.aio server on its own thread and event loop.

vLLM's worker is synchronous, so the server lives on a background thread; the
worker talks to it only through the thread-safe `TransferTable`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import grpc

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer import auth, framing
from pdserve.kvtransfer.fingerprint import KVFingerprint, mismatches
from pdserve.kvtransfer.incoming import IncomingTransfer, TransferRefused
from pdserve.kvtransfer.malloc_tuning import tune_malloc
from pdserve.kvtransfer.rpc import SERVICE
from pdserve.kvtransfer.same_node_receiver import HandoffServer
from pdserve.kvtransfer.transfer import TransferTable
from pdserve.proto import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)

_REAP_INTERVAL_S = 0.05
MAX_HANDSHAKE_BYTES = 64 << 10
"""Largest handshake accepted (a fingerprint and a name: well under a kilobyte)."""
REFUSAL_DRAIN_S = 0.5
"""How long a refused Push stream is read (and dropped) before its status goes: see `_refuse`."""


async def _refuse(frames, ctx: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a refused Push with `code` once the peer has stopped sending, or after
    REFUSAL_DRAIN_S. A status that reaches gRPC's asyncio client while one of its writes is in
    flight is replaced there by INTERNAL "Internal error from Core" (grpc/grpc#36066), and the
    sender acts on the code (ABORTED: handshake again) and reports the details. Frames read here
    are dropped unparsed, one at a time: a peer gains nothing it could not send before the refusal."""
    try:
        async with asyncio.timeout(REFUSAL_DRAIN_S):
            async for _ in frames:
                pass
    except TimeoutError:
        log.warning("KV push refused (%s: %s) while the peer still sends; ending it now", code.name, details)
    await ctx.abort(code, details)


def server_options(settings: KVTransferSettings) -> list[tuple[str, int]]:
    """The receiver's gRPC transport. Its flow-control window is fixed: unread, a caller's bytes
    wait in HTTP/2 flow control beyond it, not in this process; probing would grow it per
    connection to what the link carries, for callers without the secret too."""
    return [("grpc.max_receive_message_length", settings.max_frame_bytes), ("grpc.max_send_message_length", 1 << 20),
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", settings.receive_window_bytes)]


class KVReceiver:
    """Accepts pushed transfers for one engine and stages them until the engine loads them."""

    def __init__(self, settings: KVTransferSettings, fingerprint: KVFingerprint, receiver_id: str = ""):
        if settings.require_secret and not settings.secret_value:
            raise ValueError(
                "the KV receiver needs a cluster secret (kv_transfer.secret); "
                "set require_secret=false only for local tests"
            )
        if settings.tune_malloc:
            tune_malloc()
        self.settings = settings
        self.fingerprint = fingerprint
        self.receiver_id = receiver_id or f"receiver-{uuid.uuid4().hex[:8]}"
        self.epoch = uuid.uuid4().hex
        self.table = TransferTable(fingerprint, settings.max_staging_bytes, settings.max_lease_ms)
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._handoffs: HandoffServer | None = None
        self._claims: dict[str, asyncio.Task] = {}  # same-node transfer id -> mapping its memory file

    # --- lifecycle -------------------------------------------------------
    def start(self) -> str:
        """Bind and serve; returns the bound `host:port`."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_server())
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_until_complete(self._serve())

        self._thread = threading.Thread(target=run, name="pdserve-kv-receiver", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._loop, self._thread = None, None  # nothing to stop
            raise RuntimeError(f"KV receiver could not bind {self.settings.listen_addr}: {errors[0]}")
        log.info("KV receiver %s listening on %s (epoch %s)", self.receiver_id, self.address, self.epoch[:8])
        return self.address

    async def _start_server(self) -> None:
        # Calls at once are bounded, and both handlers check the secret before reading a message.
        self._server = grpc.aio.server(
            # No SO_REUSEPORT: a second receiver on a taken port must fail, not share its connections.
            options=[*server_options(self.settings), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.settings.max_concurrent_calls,
        )
        handlers = {
            # A unary call for the sender; served as a stream so that nothing is read before the secret is checked.
            "Handshake": grpc.stream_unary_rpc_method_handler(
                self._handshake, request_deserializer=None, response_serializer=pb.HandshakeReply.SerializeToString
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self._push, request_deserializer=None, response_serializer=pb.PushAck.SerializeToString
            ),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        creds = auth.server_credentials(self.settings)
        host, _, port = self.settings.listen_addr.rpartition(":")
        if creds is None:
            bound = self._server.add_insecure_port(self.settings.listen_addr)
        else:
            bound = self._server.add_secure_port(self.settings.listen_addr, creds)
        if bound == 0:
            raise OSError(f"port {port} unavailable")
        self.address = f"{host}:{bound}"
        if self.settings.same_node:
            self._handoffs = HandoffServer(asyncio.get_running_loop(), self.epoch, self.settings.secret_value,
                                           self.settings.max_concurrent_calls, self.settings.connect_timeout_s)
        await self._server.start()
        self._stopping = asyncio.Event()

    async def _serve(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            for tid in self.table.expire(now):
                log.warning("KV transfer %s failed: lease expired; staging freed", tid)
                self._notify(tid)
            if self._handoffs is not None:
                self._handoffs.expire(now)
            try:
                await asyncio.wait_for(self._stopping.wait(), _REAP_INTERVAL_S)
            except TimeoutError:
                pass
        assert self._server is not None
        await self._server.stop(grace=0.5)
        if self._handoffs is not None:
            self._handoffs.close()

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)
        self._loop = None

    # --- engine-facing API (any thread) ---------------------------------
    def expect(self, transfer_id: str, lease_ms: int) -> None:
        self.table.expect(transfer_id, time.monotonic() + lease_ms / 1000)

    def take(self, transfer_id: str) -> IncomingTransfer | None:
        return self.table.take(transfer_id)

    def discard(self, transfer_id: str) -> None:
        self.table.discard(transfer_id, time.monotonic())

    def cancel(self, transfer_id: str, reason: str) -> None:
        self.table.cancel(transfer_id, reason, time.monotonic())
        if self._loop is not None:  # wake a stream waiting for this transfer's outcome
            self._loop.call_soon_threadsafe(self._notify, transfer_id)

    # --- gRPC handlers (event-loop thread) ------------------------------
    def _notify(self, transfer_id: str) -> None:
        ev = self._events.get(transfer_id)
        if ev is not None:
            ev.set()

    async def _handshake(self, messages, ctx: grpc.aio.ServicerContext) -> pb.HandshakeReply:
        if not auth.is_authorized(self.settings, ctx.invocation_metadata()):
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")
        raws = [raw async for raw in _at_most(messages, 2)]
        if len(raws) != 1 or len(raws[0]) > MAX_HANDSHAKE_BYTES:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"a handshake is one message of at most {MAX_HANDSHAKE_BYTES} B")
        try:
            req = pb.HandshakeRequest.FromString(raws[0])
        except Exception:  # protobuf's DecodeError
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed handshake")
        diff = mismatches(self.fingerprint, KVFingerprint.from_proto(req.fingerprint))
        if diff:
            log.warning("refused KV sender %s: fingerprint mismatch: %s", req.sender_id, "; ".join(diff))
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "KV fingerprint mismatch: " + "; ".join(diff))
        return pb.HandshakeReply(
            receiver_id=self.receiver_id, epoch=self.epoch, max_frame_bytes=self.settings.max_frame_bytes,
            same_node_socket=self._handoffs.name if self._handoffs is not None else "",
        )

    async def _push(self, frames, ctx: grpc.aio.ServicerContext) -> pb.PushAck:
        # Authenticate before reading a single frame.
        if not auth.is_authorized(self.settings, ctx.invocation_metadata()):
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")
        try:
            return await self._consume(frames, ctx)
        finally:
            self._forget_finished_events()

    def _forget_finished_events(self) -> None:
        for tid in [*self._events, *self._claims]:
            state = self.table.state_of(tid)
            if state is None or state.terminal:
                self._events.pop(tid, None)
                self._claims.pop(tid, None)

    async def _consume(self, frames, ctx: grpc.aio.ServicerContext) -> pb.PushAck:
        transfer: IncomingTransfer | None = None
        chunks = nbytes = 0
        carried_end = False
        try:
            async for raw in frames:
                header, payload = framing.decode(raw)
                kind = header.WhichOneof("kind")
                if transfer is None:
                    if kind != "open":
                        raise TransferRefused("INVALID_ARGUMENT", "the first frame of a Push must be `open`")
                    diff = mismatches(self.fingerprint, KVFingerprint.from_proto(header.open.fingerprint))
                    if diff:
                        raise TransferRefused("FAILED_PRECONDITION", "KV fingerprint mismatch: " + "; ".join(diff))
                    if header.open.epoch != self.epoch:
                        raise TransferRefused(  # ABORTED: a failed sequence check, which the sender acts on
                            "ABORTED", f"stale epoch {header.open.epoch[:8]!r}: this receiver restarted "
                            f"as epoch {self.epoch[:8]!r} since the sender's handshake; handshake again")
                    transfer = self.table.open(header.open, time.monotonic())
                    self._events.setdefault(transfer.transfer_id, asyncio.Event())
                    if transfer.same_node:
                        await self._attach_segment(transfer)
                    continue
                if kind == "chunk":
                    if header.chunk.transfer_id != transfer.transfer_id:
                        raise TransferRefused("INVALID_ARGUMENT", "chunk for another transfer on this stream")
                    if self.table.add_chunk(transfer, header.chunk, payload, len(raw)):
                        chunks += 1
                        nbytes += payload.nbytes
                elif kind == "end":
                    if header.end.transfer_id != transfer.transfer_id:
                        raise TransferRefused("INVALID_ARGUMENT", "end for another transfer on this stream")
                    carried_end = True
                    self.table.end(transfer, header.end)
                else:
                    raise TransferRefused("INVALID_ARGUMENT", f"unexpected `{kind}` frame after open")
                if transfer.state.terminal:
                    self._notify(transfer.transfer_id)
        except framing.FrameError as exc:
            await _refuse(frames, ctx, grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc}")
        except TransferRefused as exc:
            if transfer is not None:
                self._notify(transfer.transfer_id)
            await _refuse(frames, ctx, getattr(grpc.StatusCode, exc.code), str(exc))
        if transfer is None:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty Push stream")
        assert transfer is not None
        if carried_end and not transfer.state.terminal:
            ev = self._events.setdefault(transfer.transfer_id, asyncio.Event())
            remaining = max(transfer.deadline_s - time.monotonic(), 0.0)
            try:
                await asyncio.wait_for(ev.wait(), remaining + 2 * _REAP_INTERVAL_S)
            except TimeoutError:
                pass
        return pb.PushAck(
            transfer_id=transfer.transfer_id,
            state=transfer.state.value,
            chunks_received=chunks,
            bytes_received=nbytes,
            error=transfer.error,
        )

    async def _attach_segment(self, transfer: IncomingTransfer) -> None:
        """Map the memory file the sender handed over for this same-node transfer; every stream of
        the transfer waits for the one mapping."""
        tid = transfer.transfer_id
        try:
            if self._handoffs is None:
                raise TransferRefused("FAILED_PRECONDITION", "this receiver does not take same-node transfers")
            claim = self._claims.get(tid)
            if claim is None:
                nbytes = transfer.segment_bytes(self.fingerprint.num_layers)
                claim = self._claims[tid] = asyncio.ensure_future(self._handoffs.claim(tid, nbytes))
            segment = await asyncio.shield(claim)
        except TransferRefused as exc:
            self.table.cancel(tid, str(exc), time.monotonic())
            raise
        self.table.attach_segment(transfer, segment)

    def stats(self) -> dict[str, int]:
        return self.table.snapshot()


async def _at_most(messages, n: int):
    """The first `n` messages of a stream; a longer stream is cut there, unread."""
    count = 0
    async for message in messages:
        yield message
        count += 1
        if count == n:
            return
