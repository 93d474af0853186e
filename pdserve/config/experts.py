"""How an engine buffers its MoE experts: `ExpertBufferConfig` (what the engine's workers get, as
JSON) and `ExpertPoolConfig` (what an operator writes per pool, with slot budgets per accelerator)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EvictionPolicy = Literal["lifo", "lru", "pinned_hot"]

WORKER_EXTENSION = "pdserve.experts.worker_extension.ExpertBufferExtension"
"""vLLM's `worker_extension_cls` for engines that buffer (or may be told to buffer) experts."""
CONFIG_ENV = "PDSERVE_EXPERT_BUFFERS"
"""An `ExpertBufferConfig` as JSON: engines started with it buffer their MoE layers from load on."""


class ExpertBufferConfig(BaseModel):
    """Buffered mode for every MoE layer of one engine."""

    model_config = ConfigDict(extra="forbid")

    slots: int = Field(ge=1)
    """Expert slots per MoE layer in device memory. At least the model's top-k (one token's
    experts must fit at once); at most its expert count, which is the same as not buffering."""
    policy: EvictionPolicy = "lru"
    """Which resident expert makes room, among those the current batch does not use: "lifo"
    the one loaded last (the MoE-deployment paper's choice: early, hot loads stay), "lru" the one
    used longest ago, "pinned_hot" like lru but the controller's hot set goes last."""
    prefetch: bool = True
    """Load the next layer's likely experts while this layer computes, where the platform
    overlaps copies with compute (a CUDA copy stream). CPU engines have nothing to overlap with:
    the copy would take the cores the compute needs, so there it is never done."""
    prefetch_max: int = Field(2, ge=0)
    """At most this many experts prefetched per layer and step, so prefetch cannot churn the slots."""


class ExpertPoolConfig(ExpertBufferConfig):
    """A pool's expert buffering: every replica runs its MoE layers in buffered mode."""

    slots_by_accelerator: dict[str, int] = Field(default_factory=dict)
    """Slot budgets by accelerator type (e.g. {"L4": 4, "H100": 12}), overriding `slots` for
    replicas on that type: a smaller GPU keeps fewer experts and more KV cache."""
    window_s: float = Field(60.0, gt=0)
    """The controller computes the pool's hot set from its replicas' expert activations over
    the last this many seconds."""

    @field_validator("slots_by_accelerator")
    @classmethod
    def _positive_budgets(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"slot budgets must be at least 1, got {bad}")
        return v

    def for_accelerator(self, accelerator_type: str | None) -> ExpertBufferConfig:
        slots = self.slots_by_accelerator.get(accelerator_type or "", self.slots)
        return ExpertBufferConfig(slots=slots, policy=self.policy, prefetch=self.prefetch,
                                  prefetch_max=self.prefetch_max)
