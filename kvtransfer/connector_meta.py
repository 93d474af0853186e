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


@dataclass
class GrpcWorkerMetadata(KVConnectorWorkerMetadata):
    reports: dict[str, TransferReport] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, GrpcWorkerMetadata)
        return GrpcWorkerMetadata({**self.reports, **other.reports})
