"""Receiver-side state of incoming transfers: staging, verification, leases.

Pure bookkeeping with a lock: the gRPC handlers (event-loop thread) add
chunks, the engine's worker thread takes finished transfers, and a reaper
expires leases. No I/O happens here.
"""

from __future__ import annotations

import threading

from pdserve.kvtransfer.fingerprint import KVFingerprint
from pdserve.kvtransfer.incoming import (
    CHUNK_OVERHEAD_BYTES,
    IncomingTransfer,
    MappedSegment,
    StagedChunk,
    TransferRefused,
    TransferState,
    check_transfer_id,
    payload_problem,
    range_problem,
    segment_payload,
)
from pdserve.proto import kvtransfer_pb2 as pb

MAX_TRANSFERS = 16_384
"""Transfers a table keeps, tombstones included; the oldest tombstones go first beyond it."""


class TransferTable:
    """All transfers a receiver knows, keyed by transfer id."""

    def __init__(self, fingerprint: KVFingerprint, max_staging_bytes: int, max_lease_ms: int,
                 max_transfers: int = MAX_TRANSFERS):
        self.fingerprint = fingerprint
        self.max_staging_bytes = max_staging_bytes
        self.max_lease_ms = max_lease_ms
        self.max_transfers = max_transfers
        self._lock = threading.Lock()
        self._transfers: dict[str, IncomingTransfer] = {}
        self.reserved_bytes = 0
        self.counters = {"opened": 0, "done": 0, "failed": 0, "expired": 0, "bytes": 0, "chunks": 0,
                         "duplicate_chunks": 0, "evicted_tombstones": 0, "same_node": 0}

    # --- gRPC side -------------------------------------------------------
    def open(self, msg: pb.TransferOpen, now_s: float) -> IncomingTransfer:
        """Create the transfer, or join it from another stream; reserve its staging bytes: every
        block of every layer once, with the most its chunk frames may hold beyond the payload."""
        check_transfer_id(msg.transfer_id)
        payload_block_bytes = self._sender_block_bytes(msg)
        block_bytes = payload_block_bytes + CHUNK_OVERHEAD_BYTES
        bs = self.fingerprint.block_size
        if msg.num_tokens <= 0 or msg.num_blocks != -(-msg.num_tokens // bs):
            raise TransferRefused(
                "INVALID_ARGUMENT",
                f"num_blocks={msg.num_blocks} does not cover num_tokens={msg.num_tokens} "
                f"at block_size={bs}",
            )
        if not 0 <= msg.first_block < msg.num_blocks:
            raise TransferRefused("INVALID_ARGUMENT",
                                  f"first_block={msg.first_block} outside [0, num_blocks={msg.num_blocks})")
        need = (msg.num_blocks - msg.first_block) * block_bytes * self.fingerprint.num_layers
        lease_s = min(max(msg.lease_ms, 1), self.max_lease_ms) / 1000
        with self._lock:
            t = self._transfers.get(msg.transfer_id)
            if t is not None and t.state.terminal:  # e.g. a late sender after the lease expired
                raise TransferRefused("FAILED_PRECONDITION", f"transfer already {t.state.name}: {t.error}")
            if t is not None and t.opened:
                if (t.num_tokens, t.num_blocks, t.first_block, t.same_node, t.block_bytes) != (
                        msg.num_tokens, msg.num_blocks, msg.first_block, msg.same_node, payload_block_bytes):
                    raise TransferRefused("INVALID_ARGUMENT", "stream disagrees with the transfer's size")
                return t
            if self.reserved_bytes + need > self.max_staging_bytes:
                raise TransferRefused(
                    "RESOURCE_EXHAUSTED",
                    f"staging budget: {self.reserved_bytes} B reserved + {need} B needed "
                    f"> {self.max_staging_bytes} B",
                )
            if t is None:
                if not self._make_room():
                    raise TransferRefused("RESOURCE_EXHAUSTED", f"{len(self._transfers)} transfers in flight")
                t = IncomingTransfer(msg.transfer_id, deadline_s=now_s + lease_s)
                self._transfers[msg.transfer_id] = t
            t.opened, t.num_tokens, t.num_blocks, t.first_block = True, msg.num_tokens, msg.num_blocks, msg.first_block
            t.staged_blocks = [bytearray(msg.num_blocks) for _ in range(self.fingerprint.num_layers)]
            t.reserved_bytes, t.trace_parent, t.same_node = need, msg.trace_parent, msg.same_node
            t.block_bytes = payload_block_bytes
            self.reserved_bytes += need
            self.counters["opened"] += 1
            return t

    def _sender_block_bytes(self, msg: pb.TransferOpen) -> int:
        """Bytes of one block of one layer as the sender holds it: its rank's share of the KV heads
        (the receiver checked that share against its own fingerprint)."""
        if not msg.HasField("fingerprint"):
            return self.fingerprint.block_bytes_per_layer
        return KVFingerprint.from_proto(msg.fingerprint).block_bytes_per_layer

    def add_chunk(self, t: IncomingTransfer, hdr: pb.ChunkHeader, payload: memoryview, frame_bytes: int) -> bool:
        """Verify and stage one chunk, which holds its whole frame of `frame_bytes`; a bad chunk
        fails the whole transfer. A same-node chunk's frame carries no payload: it is the chunk's
        place in the transfer's memory file. A byte-identical copy of a staged chunk (a replayed
        frame) is dropped uncounted: counted, it would exceed the sender's totals and fail a
        transfer whose bytes are all there. Any other chunk over blocks already staged is refused,
        so that what a transfer stages never exceeds its reservation. Returns whether it counted."""
        fp = self.fingerprint
        with self._lock:
            if t.state.terminal:
                return False
            key = (hdr.layer, hdr.block_start)
            old = t.chunks.get(key)
            problem = range_problem(t, hdr, fp.num_layers)
            if not problem and t.same_node:
                problem, payload = segment_payload(t, hdr, payload, t.block_bytes)
                frame_bytes += payload.nbytes
            problem = problem or payload_problem(hdr, payload, frame_bytes, t.block_bytes)
            if not problem and old is not None and old.num_blocks == hdr.num_blocks and old.payload == payload:
                self.counters["duplicate_chunks"] += 1
                return False
            if not problem and any(t.staged_blocks[hdr.layer][hdr.block_start : hdr.block_start + hdr.num_blocks]):
                problem = f"layer {hdr.layer} blocks [{hdr.block_start}, +{hdr.num_blocks}) overlap staged blocks"
            elif not problem and t.staged_bytes + frame_bytes > t.reserved_bytes:
                problem = f"staging {t.staged_bytes} + {frame_bytes} B would exceed the {t.reserved_bytes} B reserved"
            t.chunks_received += 1
            t.bytes_received += payload.nbytes
            self.counters["chunks"] += 1
            self.counters["bytes"] += payload.nbytes
            if problem:
                self._fail(t, problem)
                raise TransferRefused("DATA_LOSS", problem)
            t.chunks[key] = StagedChunk(hdr.layer, hdr.block_start, hdr.num_blocks, payload)
            t.staged_blocks[hdr.layer][hdr.block_start : hdr.block_start + hdr.num_blocks] = b"\1" * hdr.num_blocks
            t.staged_bytes += frame_bytes
            if t.state is TransferState.WAITING:
                t.state = TransferState.TRANSFERRING
            self._maybe_complete(t)
            return True

    def attach_segment(self, t: IncomingTransfer, segment: MappedSegment) -> None:
        """Give a same-node transfer its mapped memory file; a transfer already over releases it."""
        with self._lock:
            if t.segment is segment:  # another stream of the transfer attached it
                return
            if t.state.terminal or t.segment is not None:
                release = True
            else:
                t.segment, release = segment, False
                self.counters["same_node"] += 1
        if release:
            segment.release()

    def end(self, t: IncomingTransfer, msg: pb.TransferEnd) -> None:
        with self._lock:
            if t.state.terminal:
                return
            t.end_totals = (msg.num_chunks, msg.total_bytes)
            t.compute_ns = (msg.compute_start_unix_ns, msg.compute_end_unix_ns)
            self._maybe_complete(t)

    def _maybe_complete(self, t: IncomingTransfer) -> None:
        if t.end_totals is None:
            return
        want_chunks, want_bytes = t.end_totals
        if t.chunks_received < want_chunks:
            return
        if (t.chunks_received, t.bytes_received) != (want_chunks, want_bytes):
            self._fail(
                t, f"totals: got {t.chunks_received} chunks/{t.bytes_received} B, "
                f"sender sent {want_chunks}/{want_bytes}"
            )
            return
        covered = t.covered_blocks(self.fingerprint.num_layers)
        if covered < t.num_blocks:
            self._fail(t, f"only blocks [{t.first_block}, {covered}) of [{t.first_block}, {t.num_blocks}) arrived in "
                          "every layer")
            return
        t.state = TransferState.DONE
        self.counters["done"] += 1

    def _fail(self, t: IncomingTransfer, error: str, count: bool = True) -> None:
        t.state, t.error = TransferState.FAILED, error
        self.counters["failed"] += count
        self._free(t)

    def _free(self, t: IncomingTransfer) -> None:
        t.release()
        t.staged_blocks = []
        t.staged_bytes = 0
        self.reserved_bytes -= t.reserved_bytes
        t.reserved_bytes = 0

    # --- engine side -----------------------------------------------------
    def _make_room(self) -> bool:
        """Below `max_transfers` again by forgetting the oldest tombstones; False if all are live."""
        if len(self._transfers) < self.max_transfers:
            return True
        for tid, t in list(self._transfers.items()):
            if t.state is TransferState.FAILED:
                del self._transfers[tid]
                self.counters["evicted_tombstones"] += 1
                if len(self._transfers) < self.max_transfers:
                    return True
        return False

    def expect(self, transfer_id: str, deadline_s: float) -> None:
        """The decode engine waits for this transfer until `deadline_s` (its lease). A transfer
        already arriving or staged is kept at least that long: its consumer has come (the prefill
        engine samples the first token, so the decode request may come well after the push)."""
        check_transfer_id(transfer_id)
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                if self._make_room():
                    self._transfers[transfer_id] = IncomingTransfer(transfer_id, deadline_s=deadline_s)
            elif t.state is not TransferState.FAILED:
                t.deadline_s = max(t.deadline_s, deadline_s)

    def state_of(self, transfer_id: str) -> TransferState | None:
        with self._lock:
            t = self._transfers.get(transfer_id)
            return None if t is None else t.state

    def take(self, transfer_id: str) -> IncomingTransfer | None:
        """Remove and return a DONE or FAILED transfer; the caller owns its chunks now, and calls
        its `release` once it has loaded them."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None or not t.state.terminal:
                return None
            del self._transfers[transfer_id]
            self.reserved_bytes -= t.reserved_bytes
            t.reserved_bytes = 0
            return t

    def discard(self, transfer_id: str, now_s: float) -> None:
        """Forget a transfer whose request went away (aborted while its KV was on the way): its
        memory is released, and a FAILED tombstone refuses a late `open` until `expire` drops it.
        Not counted as failed: nothing went wrong with the transfer."""
        self._tombstone(transfer_id, "discarded: its request went away", now_s, count=False)

    def cancel(self, transfer_id: str, reason: str, now_s: float) -> None:
        """No request will load this transfer: free it now, or refuse it if it has not
        arrived yet (a FAILED tombstone that a late `open` runs into)."""
        self._tombstone(transfer_id, reason, now_s, count=True)

    def _tombstone(self, transfer_id: str, reason: str, now_s: float, count: bool) -> None:
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                if self._make_room():
                    self._transfers[transfer_id] = IncomingTransfer(
                        transfer_id, deadline_s=now_s, state=TransferState.FAILED, error=reason
                    )
            elif t.state is not TransferState.FAILED:
                self._fail(t, reason, count)
                t.deadline_s = min(t.deadline_s, now_s)

    def expire(self, now_s: float, tombstone_s: float = 60.0) -> list[str]:
        """Fail every transfer past its lease; drop long-dead ones nobody claimed."""
        expired = []
        with self._lock:
            for tid, t in list(self._transfers.items()):
                if now_s > t.deadline_s and t.state is not TransferState.FAILED:
                    self._fail(t, f"lease expired in state {t.state.name}")
                    self.counters["expired"] += 1
                    expired.append(tid)
                elif t.state is TransferState.FAILED and now_s > t.deadline_s + tombstone_s:
                    self._free(t)
                    del self._transfers[tid]
        return expired

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                **self.counters,
                "active": sum(not t.state.terminal for t in self._transfers.values()),
                "reserved_bytes": self.reserved_bytes,
                "staged_bytes": sum(t.staged_bytes for t in self._transfers.values()),
            }

