"""What the connector's scheduler side tells its worker side each step, and back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class SendJob:
    """Prefill: after this step's forward, logical blocks [first_block, first_block +
    len(block_ids)) of every layer hold this request's prompt KV and are pushed."""

    req_id: str
    transfer_id: str
    dest: str
    lease_ms: int
    num_tokens: int
    first_block: int
    block_ids: list[int]
    is_last: bool  # this step computes the prompt's last token: send the end marker
    trace_parent: str = ""
    dest_tp: int = 1  # the decode engine's tensor-parallel ranks (`tp_shards`)


@dataclass
class LoadJob:
    """Decode: logical blocks [first_block, first_block + len(block_ids)) arrive under
    `transfer_id` and go into the physical `block_ids` vLLM allocated."""

    req_id: str
    transfer_id: str
    lease_ms: int
    num_tokens: int
    first_block: int
    block_ids: list[int]
    src_tp: int = 1  # the prefill engine's tensor-parallel ranks: a part of the transfer from each


@dataclass
class GrpcConnectorMetadata(KVConnectorMetadata):
    sends: list[SendJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    # Decode: transfers no request will load (aborted while queued, or prompt fully
    # cached here); the receiver frees or refuses them instead of holding them a lease.
    cancels: dict[str, str] = field(default_factory=dict)  # transfer_id -> reason


@dataclass
class TransferReport:
    """Outcome of one request's transfer, as the worker saw it; returned to the client
    in the request's `kv_transfer_params`."""

    transfer_id: str
    state: str  # "DONE" or "FAILED"
    tokens: int
    bytes: int
    error: str = ""
    prefill_compute_ms: float = 0.0
    exposed_ms: float = 0.0  # end of prefill compute -> KV ready in the decode cache
    load_ms: float = 0.0  # copy from staging into the paged cache
    trace_parent: str = ""  # the prefill span's W3C traceparent, as the sender sent it
    start_unix_ns: int = 0  # prefill forward start: the push overlaps it from here
    ready_unix_ns: int = 0  # KV in the decode cache

    def merge(self, other: TransferReport) -> TransferReport:
        """One request's report from two tensor-parallel ranks: failed if either failed, the bytes
        of both, ready when the later one was."""
        failed = self if self.state == "FAILED" else other if other.state == "FAILED" else None
        return TransferReport(
            transfer_id=self.transfer_id, state=failed.state if failed else self.state,
            tokens=0 if failed else self.tokens, bytes=self.bytes + other.bytes,
            error=failed.error if failed else "",
            prefill_compute_ms=max(self.prefill_compute_ms, other.prefill_compute_ms),
            exposed_ms=max(self.exposed_ms, other.exposed_ms), load_ms=max(self.load_ms, other.load_ms),
            trace_parent=self.trace_parent or other.trace_parent,
            start_unix_ns=min((t for t in (self.start_unix_ns, other.start_unix_ns) if t), default=0),
            ready_unix_ns=max(self.ready_unix_ns, other.ready_unix_ns))


@dataclass
class GrpcWorkerMetadata(KVConnectorWorkerMetadata):
    reports: dict[str, TransferReport] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, GrpcWorkerMetadata)
        reports = dict(self.reports)
        for req_id, r in other.reports.items():
            reports[req_id] = reports[req_id].merge(r) if req_id in reports else r
        return GrpcWorkerMetadata(reports)
