"""One incoming transfer as the receiver holds it: its state, its staged chunks, and the checks
every chunk passes before it is staged (its range, its payload's size and checksum, its place in
a same-node memory file). Data and pure checks; the table (`transfer.py`) holds the lock."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.kvtransfer.framing import checksum
from pdserve.proto import kvtransfer_pb2 as pb

MAX_TRANSFER_ID_BYTES = 128
"""Longest transfer id accepted (pdserve's are request ids of about 40 bytes)."""
CHUNK_OVERHEAD_BYTES = 256
"""Most bytes a chunk frame holds beyond its payload, given transfer ids of at most
`MAX_TRANSFER_ID_BYTES`; a transfer's reservation includes it for every block of every layer."""


class TransferState(enum.Enum):
    WAITING = pb.WAITING
    TRANSFERRING = pb.TRANSFERRING
    DONE = pb.DONE
    FAILED = pb.FAILED

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class MappedSegment(Protocol):
    """A same-node transfer's memory file as the receiver maps it (see `same_node`)."""

    view: memoryview

    def release(self) -> None: ...


class TransferRefused(Exception):
    """A transfer (or frame) that the receiver will not accept; `code` is a gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class StagedChunk:
    layer: int
    block_start: int
    num_blocks: int
    payload: memoryview  # view into the received gRPC message; no copy


@dataclass
class IncomingTransfer:
    transfer_id: str
    deadline_s: float
    opened: bool = False
    num_tokens: int = 0
    num_blocks: int = 0
    first_block: int = 0  # blocks before it are not carried (the receiver's engine holds them)
    block_bytes: int = 0  # payload bytes of one block of one layer: the sending rank's KV heads
    state: TransferState = TransferState.WAITING
    error: str = ""
    chunks: dict[tuple[int, int], StagedChunk] = field(default_factory=dict)
    staged_blocks: list[bytearray] = field(default_factory=list)  # per layer, 1 where a block is staged
    chunks_received: int = 0
    bytes_received: int = 0
    staged_bytes: int = 0  # what the staged chunks hold: their whole frames
    reserved_bytes: int = 0
    end_totals: tuple[int, int] | None = None
    compute_ns: tuple[int, int] = (0, 0)  # sender's prefill forward start/end, unix ns
    trace_parent: str = ""  # the prefill span's W3C traceparent: parent of the kv_transfer span
    same_node: bool = False  # payloads are in a memory file the sender handed over, not in frames
    segment: MappedSegment | None = None  # that file, mapped once a stream claimed it

    def segment_bytes(self, num_layers: int) -> int:
        """Size of a same-node transfer's memory file: every carried block of every layer."""
        return (self.num_blocks - self.first_block) * self.block_bytes * num_layers

    def release(self) -> None:
        """Drop the staged payloads: what the engine loaded, or a failed transfer's."""
        self.chunks.clear()
        if self.segment is not None:
            self.segment.release()
            self.segment = None

    def covered_blocks(self, num_layers: int) -> int:
        """End of the run of logical blocks from `first_block` staged in every layer."""
        per_layer = [set() for _ in range(num_layers)]
        for c in self.chunks.values():
            per_layer[c.layer].update(range(c.block_start, c.block_start + c.num_blocks))
        n = self.first_block
        while n < self.num_blocks and all(n in s for s in per_layer):
            n += 1
        return n


def range_problem(t: IncomingTransfer, hdr: pb.ChunkHeader, num_layers: int) -> str:
    if not 0 <= hdr.layer < num_layers:
        return f"layer {hdr.layer} out of range [0, {num_layers})"
    if hdr.num_blocks <= 0 or not t.first_block <= hdr.block_start <= t.num_blocks - hdr.num_blocks:
        return f"blocks [{hdr.block_start}, +{hdr.num_blocks}) outside [{t.first_block}, {t.num_blocks})"
    return ""


def segment_payload(t: IncomingTransfer, hdr: pb.ChunkHeader, payload: memoryview,
                    block_bytes: int) -> tuple[str, memoryview]:
    """(problem, payload) of a same-node chunk: its place in the transfer's memory file, which
    holds every carried block layer by layer, so that no peer names an offset."""
    if payload.nbytes:
        return "a same-node chunk carries its payload in the frame", payload
    if t.segment is None:
        return "a same-node chunk before the transfer's memory file", payload
    carried = t.num_blocks - t.first_block
    offset = (hdr.layer * carried + hdr.block_start - t.first_block) * block_bytes
    return "", t.segment.view[offset : offset + hdr.num_blocks * block_bytes]


def payload_problem(hdr: pb.ChunkHeader, payload: memoryview, frame_bytes: int, block_bytes: int) -> str:
    if payload.nbytes != hdr.num_blocks * block_bytes:
        return f"payload {payload.nbytes} B != {hdr.num_blocks} blocks x {block_bytes} B"
    if frame_bytes - payload.nbytes > CHUNK_OVERHEAD_BYTES:
        return f"chunk frame of {frame_bytes} B holds more than its payload + {CHUNK_OVERHEAD_BYTES} B"
    if checksum([payload]) != hdr.crc32c:
        return f"checksum mismatch in layer {hdr.layer} blocks [{hdr.block_start}, +{hdr.num_blocks})"
    return ""


def check_transfer_id(transfer_id: str) -> None:
    if not transfer_id or len(transfer_id.encode()) > MAX_TRANSFER_ID_BYTES:
        raise TransferRefused("INVALID_ARGUMENT",
                              f"transfer ids are 1 to {MAX_TRANSFER_ID_BYTES} bytes, got {len(transfer_id.encode())}")
