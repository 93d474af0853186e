"""The `kv_transfer_params` a caller puts on a request to route its KV through pdserve.

vLLM carries them in `SamplingParams.extra_args["kv_transfer_params"]`; the
connector reads the `pdserve_kv` entry and ignores everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEY = "pdserve_kv"


@dataclass(frozen=True)
class SendParams:
    """Prefill side: push this request's prompt KV to `dest` under `transfer_id`."""

    transfer_id: str
    dest: str
    lease_ms: int
    trace_parent: str = ""  # W3C traceparent of the prefill span; carried in TransferOpen
    skip_tokens: int = 0
    """Leading prompt tokens the decode engine is expected to hold in its prefix cache: the whole
    blocks among them are not sent (at most all blocks but the last)."""
    dest_tp: int = 1
    """Tensor-parallel ranks of the decode engine: rank d listens at `dest`'s port + d."""


@dataclass(frozen=True)
class RecvParams:
    """Decode side: the prompt KV arrives under `transfer_id`; wait at most `lease_ms`."""

    transfer_id: str
    lease_ms: int
    kv_tokens: int | None = None
    """How many leading tokens of the request's prompt the KV covers; None: all of them. Fewer when
    the prefill engine also sampled the answer's first token, which ends the prompt here and is
    computed on this engine."""
    skip_tokens: int = 0
    """What the prefill side was told this engine holds (`SendParams.skip_tokens`): when its prefix
    cache holds less, the transfer lacks blocks this request needs, and the prompt is computed here."""
    src_tp: int = 1
    """Tensor-parallel ranks of the prefill engine: each sends its share of the KV heads."""


MAX_TP = 64
"""Largest tensor-parallel size a peer may name."""


def for_prefill(transfer_id: str, dest: str, lease_ms: int = 30_000, trace_parent: str = "",
                skip_tokens: int = 0, dest_tp: int = 1) -> dict[str, Any]:
    p: dict[str, Any] = {"op": "send", "transfer_id": transfer_id, "dest": dest, "lease_ms": lease_ms}
    if trace_parent:
        p["trace_parent"] = trace_parent
    if skip_tokens:
        p["skip_tokens"] = skip_tokens
    if dest_tp != 1:
        p["dest_tp"] = dest_tp
    return {KEY: p}


def for_decode(transfer_id: str, lease_ms: int = 30_000, kv_tokens: int | None = None,
               skip_tokens: int = 0, src_tp: int = 1) -> dict[str, Any]:
    p: dict[str, Any] = {"op": "recv", "transfer_id": transfer_id, "lease_ms": lease_ms}
    if kv_tokens is not None:
        p["kv_tokens"] = kv_tokens
    if skip_tokens:
        p["skip_tokens"] = skip_tokens
    if src_tp != 1:
        p["src_tp"] = src_tp
    return {KEY: p}


def _tp(p: dict[str, Any], name: str) -> int:
    tp = p.get(name, 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_TP:
        raise ValueError(f"{KEY}.{name} must be a tensor-parallel size in [1, {MAX_TP}], got {tp!r}")
    return tp


def parse(kv_transfer_params: dict[str, Any] | None) -> SendParams | RecvParams | None:
    """The request's pdserve params, or None; raises ValueError naming a malformed field."""
    if not kv_transfer_params or KEY not in kv_transfer_params:
        return None
    p = kv_transfer_params[KEY]
    if not isinstance(p, dict):
        raise ValueError(f"{KEY} must be a mapping, got {type(p).__name__}")
    tid, lease = p.get("transfer_id"), p.get("lease_ms", 30_000)
    if not isinstance(tid, str) or not tid:
        raise ValueError(f"{KEY}.transfer_id must be a non-empty string")
    if isinstance(lease, bool) or not isinstance(lease, int) or lease <= 0:
        raise ValueError(f"{KEY}.lease_ms must be a positive integer, got {lease!r}")
    skip_tokens = p.get("skip_tokens", 0)
    if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
        raise ValueError(f"{KEY}.skip_tokens must be a non-negative integer, got {skip_tokens!r}")
    op = p.get("op")
    if op == "send":
        dest = p.get("dest")
        if not isinstance(dest, str) or ":" not in dest:
            raise ValueError(f"{KEY}.dest must be 'host:port', got {dest!r}")
        trace_parent = p.get("trace_parent", "")
        if not isinstance(trace_parent, str) or len(trace_parent) > 256:
            raise ValueError(f"{KEY}.trace_parent must be a W3C traceparent string")
        return SendParams(tid, dest, lease, trace_parent, skip_tokens, _tp(p, "dest_tp"))
    if op == "recv":
        kv_tokens = p.get("kv_tokens")
        if kv_tokens is not None and (isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int) or kv_tokens <= 0):
            raise ValueError(f"{KEY}.kv_tokens must be a positive integer, got {kv_tokens!r}")
        return RecvParams(tid, lease, kv_tokens, skip_tokens, _tp(p, "src_tp"))
    raise ValueError(f"{KEY}.op must be 'send' or 'recv', got {op!r}")
