"""An autoscaling policy file: how big each pool may be, what objective it is sized for,
which signals it reads, how fast it may move, and what GPUs cost.

Operators write it as YAML (`k8s/policies/` has examples; `pdserve schema autoscaling`
prints the JSON Schema for editors) and check it with `pdserve autoscale --replay`
before rolling it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.config.files import describe, read_mapping
from pdserve.config.routing import CPU_PROFILE, LatencyProfile

PrefillSignal = Literal["prompt_tokens_per_s", "queued_prefill_tokens", "ttft_ms"]
DecodeSignal = Literal["output_tokens_per_s", "running_seqs", "kv_usage", "tpot_ms"]


class PoolScaling(BaseModel):
    """Bounds and pace of one pool; the objective and signals are per role (below)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    accelerator_type: str = "cpu"
    """GPU type the pool runs on (e.g. "H100", "L4"): the key into `gpu_cost_per_hour`, and
    the KubeRay worker group the pool's replicas land in."""
    gpus_per_replica: float = Field(1.0, ge=0)
    """GPUs one replica holds (its tensor-parallel size); counted against `gpu_budget`."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(8, ge=1)
    upscale_delay_s: float = Field(30.0, ge=0)
    """A need for more replicas must last this long before any is added, so a spike shorter
    than a replica's start-up does not buy one."""
    downscale_delay_s: float = Field(300.0, ge=0)
    """A need for fewer replicas must last this long before any is removed."""
    max_step: int = Field(2, ge=1)
    """Replicas added or removed by one decision at most."""
    target_utilization: float = Field(0.8, gt=0, le=1)
    """Fraction of a replica's capacity at its objective that sizing plans to use; the rest is
    headroom for bursts and for the time new replicas take to start."""
    downscale_tolerance: float = Field(0.15, ge=0, lt=1)
    """Hysteresis: the pool shrinks only when the smaller size would still run this fraction
    below `target_utilization`, so demand hovering at a boundary does not flap the size."""
    profile: LatencyProfile = CPU_PROFILE
    """Latency of one replica of this accelerator type serving the model (`pdserve bench route
    --help` says how to measure it); the decision corrects it by measured/predicted latency."""

    @model_validator(mode="after")
    def _bounds(self) -> "PoolScaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        return self


class PrefillScaling(PoolScaling):
    """The prefill pool, sized for time to first token."""

    ttft_ms: float = Field(2000.0, gt=0)
    """TTFT objective the pool is sized for: its replicas' prefill queues stay short enough for it."""
    signals: list[PrefillSignal] = Field(
        default_factory=lambda: ["prompt_tokens_per_s", "queued_prefill_tokens", "ttft_ms"], min_length=1)
    """What it reads: prompt_tokens_per_s (demand), queued_prefill_tokens (backlog to drain),
    ttft_ms (measured latency, to correct the profile)."""

    @model_validator(mode="after")
    def _has_demand(self) -> "PrefillScaling":
        if not {"prompt_tokens_per_s", "queued_prefill_tokens"} & set(self.signals):
            raise ValueError("prefill signals need prompt_tokens_per_s or queued_prefill_tokens to measure demand")
        return self


class DecodeScaling(PoolScaling):
    """The decode pool, sized for time per output token."""

    tpot_ms: float = Field(200.0, gt=0)
    """TPOT objective the pool is sized for: its replicas' batches stay small enough for it."""
    signals: list[DecodeSignal] = Field(
        default_factory=lambda: ["output_tokens_per_s", "running_seqs", "kv_usage", "tpot_ms"], min_length=1)
    """What it reads: output_tokens_per_s and running_seqs (demand), kv_usage (memory
    demand), tpot_ms (measured latency, to correct the profile)."""
    kv_usage_target: float = Field(0.85, gt=0, le=1)
    """Fraction of the pool's KV cache that sizing lets requests hold."""

    @model_validator(mode="after")
    def _has_demand(self) -> "DecodeScaling":
        if not {"output_tokens_per_s", "running_seqs", "kv_usage"} & set(self.signals):
            raise ValueError("decode signals need output_tokens_per_s, running_seqs or kv_usage to measure demand")
        return self


class AutoscalingPolicy(BaseModel):
    """Both pools of one model, sized together."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    interval_s: float = Field(10.0, gt=0)
    """Time between decisions."""
    window_s: float = Field(30.0, gt=0)
    """Rates (requests, tokens per second) are averaged over this much recent time."""
    backlog_drain_s: float = Field(10.0, gt=0)
    """Queued prefill tokens count as demand to be drained within this time."""
    prefill: PrefillScaling = Field(default_factory=PrefillScaling)
    decode: DecodeScaling = Field(default_factory=DecodeScaling)
    gpu_budget: float | None = Field(None, ge=0)
    """GPUs both pools may hold together; None: no cap. Over it, replicas are cut where
    they lose the least predicted goodput (ties: the dearer GPU first)."""
    gpu_cost_per_hour: dict[str, float] = Field(default_factory=dict)
    """Price of one GPU-hour per accelerator type, for the cost the decision and the replay
    report; types not listed cost 0."""

    @model_validator(mode="after")
    def _minimums_fit_budget(self) -> "AutoscalingPolicy":
        if self.gpu_budget is not None:
            floor = sum(p.min_replicas * p.gpus_per_replica for p in self.pools().values())
            if floor > self.gpu_budget:
                raise ValueError(f"the pools' min_replicas hold {floor:g} GPUs, over gpu_budget {self.gpu_budget:g}")
        return self

    def pools(self) -> dict[str, PoolScaling]:
        return {"prefill": self.prefill, "decode": self.decode}

    def cost_per_hour(self, replicas: dict[str, int]) -> float:
        return sum(n * self.pools()[pool].gpus_per_replica * self.gpu_cost_per_hour.get(
            self.pools()[pool].accelerator_type, 0.0) for pool, n in replicas.items())


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names every bad field."""


def parse_policy(data: Any, source: str = "policy") -> AutoscalingPolicy:
    if data is not None and not isinstance(data, dict):
        raise PolicyError(f"{source} must hold a mapping of settings, got {type(data).__name__}")
    try:
        return AutoscalingPolicy.model_validate(data or {})
    except ValidationError as err:
        raise PolicyError(f"{source} is invalid:\n{describe(err)}") from None


def load_policy(path: str | Path) -> AutoscalingPolicy:
    return parse_policy(read_mapping(Path(path), "policy", PolicyError), str(path))


def policy_schema() -> dict:
    """JSON Schema of the policy file, for editors (`# yaml-language-server: $schema=...`)."""
    schema = AutoscalingPolicy.model_json_schema()
    schema["title"] = "pdserve autoscaling policy"
    return schema
