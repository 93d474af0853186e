"""One pool of identical engine replicas, as the cluster configuration states it: its size, where
its replicas land, and the vLLM engine arguments they run with."""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pdserve.config.experts import ExpertPoolConfig

# Engine arguments pdserve sets itself; a pool may not override them.
_RESERVED_ENGINE_ARGS = {"model", "dtype", "max_model_len", "kv_transfer_config", "served_model_name",
                         "worker_extension_cls"}
UNSPLIT_ENGINE_ARGS = ("pipeline_parallel_size", "data_parallel_size")
"""Engine arguments that split one engine over workers whose KV the connector cannot move as parts of
one transfer (tensor parallelism it can: each rank moves its share of the heads)."""


@cache
def _engine_arg_names() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


class PoolConfig(BaseModel):
    """One pool of identical engine replicas (prefill, decode, colocated or adaptive)."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, le=1024)
    """Number of engine replicas in the pool."""
    accelerator_type: str | None = None
    """Ray accelerator type (e.g. "H100", "L4"): replicas only land on nodes that carry
    the resource `accelerator_type:<type>`, so prefill and decode can sit on different GPUs."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves per replica (0 on CPU-only clusters)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Extra custom Ray resources each replica needs."""
    cpu_binds: list[str] = Field(default_factory=list)
    """CPU engines only: cores for each replica's compute (vLLM's VLLM_CPU_OMP_THREADS_BIND),
    indexed by the replica's rank on its node, e.g. ["0"] or ["0", "1"]; empty lets vLLM choose."""
    kv_cache_gib: int = Field(1, ge=1)
    """CPU engines only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    cpu_nice: int = Field(10, ge=0, le=19)
    """CPU engines only: scheduling niceness of the engine's processes. Engines keep their cores
    busy; a positive value lets the ingress, controller and proxy sharing those cores run first,
    so routing and refusals stay fast under load. Ignored on GPU engines."""
    warmup: bool = True
    """Before the replica takes traffic, run prompts that fill the engine's largest step and spill
    into the next: an engine's first prompt longer than any before runs several times slower (on
    this project's CPU, 1000 tokens: 4.6 s the first time, 0.7 s after), which would break the
    first requests' objectives and mislead the controller's latency model."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica runs at once; the router treats a full replica as unavailable."""
    experts: ExpertPoolConfig | None = None
    """MoE models only: run each MoE layer with a few expert slots in device memory and every
    expert in host memory (typically decode pools; prefill touches nearly every expert). None
    keeps all experts resident."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Further vLLM engine arguments (AsyncEngineArgs fields), e.g. max_num_seqs,
    max_num_batched_tokens, gpu_memory_utilization, enforce_eager."""

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(set(v) & _RESERVED_ENGINE_ARGS)
        if reserved:
            raise ValueError(f"{reserved} are set by pdserve from the top-level config, not per pool")
        unknown = sorted(set(v) - _engine_arg_names())
        if unknown:
            raise ValueError(f"unknown vLLM engine arguments {unknown}")
        return v

    @model_validator(mode="after")
    def _a_gpu_per_rank(self) -> "PoolConfig":
        if self.tp_size > 1 and self.num_gpus and self.num_gpus < self.tp_size:  # (fractions share a GPU at TP 1)
            raise ValueError(f"tensor_parallel_size {self.tp_size} runs a rank on each of {self.tp_size} GPUs, "
                             f"but num_gpus is {self.num_gpus}")
        return self

    @property
    def tp_size(self) -> int:
        """Tensor-parallel ranks of each replica's engine."""
        return int(self.engine_args.get("tensor_parallel_size", 1))

    @property
    def on_cpu(self) -> bool:
        """Whether this pool's engines run on CPUs (Ray gives them no GPU)."""
        return self.num_gpus == 0

    def ray_actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts
