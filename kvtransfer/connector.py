"""GrpcKVConnector: vLLM's KV connector API over pdserve's gRPC transfer layer.

Enable it on an engine with::

    KVTransferConfig(kv_connector="GrpcKVConnector",
                     kv_connector_module_path="pdserve.kvtransfer.connector",
                     kv_role="kv_producer" | "kv_consumer" | "kv_both",
                     kv_connector_extra_config={...KVTransferSettings fields...})

and route a request by putting `params.for_prefill(...)` / `params.for_decode(...)`
in `SamplingParams.extra_args["kv_transfer_params"]`. With tensor parallelism each rank's
worker moves its own share of the KV heads (`tp_shards.py`); the two engines may differ in TP size.

vLLM creates one instance per role: SCHEDULER (in the engine core; plans which
blocks move) and WORKER (next to the KV cache; moves the bytes). Each method
below says which side calls it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer.connector_meta import GrpcConnectorMetadata, GrpcWorkerMetadata
from pdserve.kvtransfer.connector_scheduler import SchedulerSide
from pdserve.kvtransfer.connector_worker import WorkerSide
from pdserve.kvtransfer.tp_shards import check_shardable

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class GrpcKVConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        if len(kv_cache_config.kv_cache_groups) > 1:
            raise ValueError("GrpcKVConnector supports models with one KV cache group (full attention) only")
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.settings = KVTransferSettings(**(ktc.kv_connector_extra_config or {}))
        block_size = vllm_config.cache_config.block_size
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = SchedulerSide(block_size)
        else:
            mc = vllm_config.model_config
            model_id = self.settings.model_id or mc.served_model_name or os.path.basename(mc.model.rstrip("/"))
            tp_size = vllm_config.parallel_config.tensor_parallel_size
            if tp_size > 1:  # each rank moves its share of the heads; replicated heads are refused
                check_shardable(mc.get_total_num_kv_heads(), tp_size)
            self._worker = WorkerSide(
                self.settings,
                model_id=str(model_id),
                block_size=block_size,
                num_kv_heads=mc.get_num_kv_heads(vllm_config.parallel_config),
                head_size=mc.get_head_size(),
                num_blocks=kv_cache_config.num_blocks,
                produce=ktc.is_kv_producer,
                consume=ktc.is_kv_consumer,
                tp_rank=get_tensor_model_parallel_rank() if tp_size > 1 else 0,
                tp_size=tp_size,
            )

    @property
    def worker(self) -> WorkerSide:
        assert self._worker is not None
        return self._worker

    @property
    def sched(self) -> SchedulerSide:
        assert self._sched is not None
        return self._sched

    # ---- worker side -----------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Worker, once at startup: learn the paged cache; start the receiver/sender."""
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata) -> None:
        """Worker, before each step's forward: open this step's pushes, expect its loads."""
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, GrpcConnectorMetadata)
        self.worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Worker: nothing to start; loads are asynchronous and land between steps."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Worker, per layer: no synchronous loads, so never blocks."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        """Worker, right after a layer's attention wrote its KV: push that layer's blocks."""
        self.worker.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        """Worker, after the forward: send end markers for prompts completed this step."""
        self.worker.wait_for_save()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Worker, after each step: pushes acknowledged; loads copied into the cache or failed."""
        sending, recving = self.worker.transfer_results(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Worker: the base interface's older form; answers exactly as get_transfer_results."""
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending, r.finished_recving

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Worker, same pass as get_transfer_results: blocks of failed loads, so vLLM's
        kv_load_failure_policy recomputes them or fails the request."""
        return self.worker.take_invalid_blocks()

    def build_connector_worker_meta(self) -> GrpcWorkerMetadata | None:
        """Worker, after each step: per-request transfer reports for the scheduler side."""
        reports = self.worker.take_reports()
        return GrpcWorkerMetadata(reports) if reports else None

    def discard_transfer(self, transfer_id: str, src_tp: int = 1) -> bool:
        """Worker, called by pdserve (not vLLM): free a transfer no request will load (this rank's
        parts of it, from a prefill engine of `src_tp` ranks); False on an engine that receives none."""
        return self.worker.discard(transfer_id, src_tp)

    def shutdown(self) -> None:
        """Worker or scheduler, at engine shutdown: stop servers and streams."""
        if self._worker is not None:
            self._worker.shutdown()

    # ---- scheduler side ----------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.sched.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Scheduler: a decode request's prompt KV comes from the wire, asynchronously."""
        return self.sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """Scheduler: a load fills the request's own blocks of the (single) KV cache group,
        so vLLM need not zero them."""
        return (0,)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Scheduler, after allocating blocks: plan the load (decode) or track the push (prefill)."""
        self.sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> GrpcConnectorMetadata:
        """Scheduler, each step: the pushes and loads the worker performs this step."""
        return self.sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Scheduler, after each step: keep the worker's per-request transfer reports."""
        meta = connector_output.kv_connector_worker_meta
        self.sched.update_connector_output(meta if isinstance(meta, GrpcWorkerMetadata) else None)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Scheduler, once per request: a producer holds blocks until its push is acknowledged;
        the returned params (transfer outcome) reach the caller's RequestOutput."""
        return self.sched.request_finished(request, block_ids)
