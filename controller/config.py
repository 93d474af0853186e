"""The controller's section of the cluster config: which routing policy, and the numbers
the SLO-aware one predicts with."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pdserve.controller.latency_model import CPU_PROFILE, LatencyProfile


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["slo", "least_load"] = "slo"
    """"slo": the pair predicted to meet the request's objectives, refusing early what none
    would meet; "least_load": the least-loaded instance of each pool (the baseline)."""
    priority_margin: float = Field(0.1, ge=0, le=0.5)
    """A request of priority p must be predicted to meet its objectives with a margin of
    p x this fraction of them, so lower priorities are refused first as load grows."""
    local_prefill_max_tokens: int = Field(64, ge=0)
    """Prompts up to this many tokens may be prefilled on the decode instance itself, when
    that is predicted to give the first token sooner than a prefill instance plus the KV
    transfer; 0 always disaggregates."""
    intra_node_kv_gbps: float = Field(10.0, gt=0)
    """KV transfer bandwidth between instances on one node, in gigabits per second."""
    inter_node_kv_gbps: float = Field(10.0, gt=0)
    """The same between nodes; set it lower when that network is slow and the router weighs
    same-node pairs accordingly."""
    kv_reserve_tokens: int = Field(256, ge=0)
    """Output tokens of KV room a decode instance must have free for a new request (at most
    its max_tokens), beyond its prompt."""
    ttl_s: float = Field(3.0, gt=0)
    """An instance silent this long gets no new requests until it reports again."""
    probe_after_s: float = Field(5.0, ge=0)
    """Once no request has been routed for this long because every pair was predicted to miss,
    the next such request is served best effort as a probe: its latency re-measures predictions
    that would otherwise stay pessimistic with the engines idle (a correction learned under load,
    a profile slower than the hardware), refusing everything for good. 0: never probe."""
    profiles: dict[str, LatencyProfile] = Field(default_factory=lambda: {"default": CPU_PROFILE})
    """Latency profile per accelerator type (a pool's `accelerator_type`); "default" covers
    pools without one or of a type not listed. Each instance's predictions are corrected
    online from its observed latencies."""

    @field_validator("profiles")
    @classmethod
    def _has_default(cls, v: dict[str, LatencyProfile]) -> dict[str, LatencyProfile]:
        if "default" not in v:
            raise ValueError('needs a "default" profile for instances of unlisted accelerator types')
        return v
