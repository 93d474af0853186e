"""Methods vLLM mixes into each of an engine's workers (`worker_extension_cls`), called by
name through the engine's `collective_rpc`: the engine process drives buffering in its workers
without shipping code to them.

Buffering from the start. vLLM imports this module in every worker before it loads the
model, so importing it also wraps the unquantized fused-MoE method's post-load step: when
`PDSERVE_EXPERT_BUFFERS` holds an `ExpertBufferConfig` (JSON), each MoE layer is buffered
as soon as its weights are ready, before vLLM measures free device memory to size its KV
cache; the experts that left the device become KV blocks. Installing later (`collective_rpc`)
is for benchmarks and tests that compare settings within one engine.
"""

from __future__ import annotations

import functools
import os

from pdserve.config.experts import CONFIG_ENV, ExpertBufferConfig
from pdserve.experts import vllm_layers
from pdserve.experts.buffer import ExpertBuffer

_loaded: list[ExpertBuffer] = []
"""Layers buffered while this process loaded its model, in load (forward) order."""


def _buffer_after_loading(original):
    @functools.wraps(original)
    def process_weights_after_loading(self, layer) -> None:
        original(self, layer)
        config_json = os.environ.get(CONFIG_ENV)
        if not config_json:
            return
        vllm_layers.check_supported(getattr(layer, "layer_name", type(layer).__name__), layer)
        buffer = vllm_layers.buffer_layer(layer, ExpertBufferConfig.model_validate_json(config_json), len(_loaded))
        if _loaded:
            _loaded[-1].next = buffer
        _loaded.append(buffer)

    process_weights_after_loading.pdserve_wrapped = True
    return process_weights_after_loading


def _wrap_moe_loading() -> None:
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    current = UnquantizedFusedMoEMethod.process_weights_after_loading
    if not getattr(current, "pdserve_wrapped", False):
        UnquantizedFusedMoEMethod.process_weights_after_loading = _buffer_after_loading(current)


_wrap_moe_loading()


class ExpertBufferExtension:
    """Mixed into vLLM's worker class; `self.model_runner.model` is the loaded model."""

    def pdserve_install_expert_buffers(self, config_json: str) -> dict:
        vllm_layers.install(self.model_runner.model, ExpertBufferConfig.model_validate_json(config_json))
        return vllm_layers.stats(self.model_runner.model)

    def pdserve_uninstall_expert_buffers(self) -> None:
        vllm_layers.uninstall(self.model_runner.model)

    def pdserve_require_expert_buffers(self) -> None:
        vllm_layers.require_buffered(self.model_runner.model)

    def pdserve_expert_stats(self) -> dict:
        return vllm_layers.stats(self.model_runner.model)

    def pdserve_reset_expert_stats(self) -> None:
        for buffer in vllm_layers.buffers_of(self.model_runner.model):
            buffer.reset_counters()

    def pdserve_set_hot_experts(self, hot: list[list[int]]) -> None:
        """The controller's hot set, one list of expert ids per MoE layer."""
        for buffer, experts in zip(vllm_layers.buffers_of(self.model_runner.model), hot, strict=False):
            buffer.set_hot(experts)
