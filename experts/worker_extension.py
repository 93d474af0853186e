"""Methods vLLM mixes into each of an engine's workers (`worker_extension_cls`), called by
name through the engine's `collective_rpc`: the engine process drives buffering in its workers
without shipping code to them."""

from __future__ import annotations

from pdserve.experts import vllm_layers
from pdserve.experts.config import ExpertBufferConfig

WORKER_EXTENSION = "pdserve.experts.worker_extension.ExpertBufferExtension"


class ExpertBufferExtension:
    """Mixed into vLLM's worker class; `self.model_runner.model` is the loaded model."""

    def pdserve_install_expert_buffers(self, config_json: str) -> dict:
        vllm_layers.install(self.model_runner.model, ExpertBufferConfig.model_validate_json(config_json))
        return vllm_layers.stats(self.model_runner.model)

    def pdserve_uninstall_expert_buffers(self) -> None:
        vllm_layers.uninstall(self.model_runner.model)

    def pdserve_expert_stats(self) -> dict:
        return vllm_layers.stats(self.model_runner.model)

    def pdserve_reset_expert_stats(self) -> None:
        for buffer in vllm_layers.buffers_of(self.model_runner.model):
            buffer.reset_counters()

    def pdserve_set_hot_experts(self, hot: list[list[int]]) -> None:
        """The controller's hot set, one list of expert ids per MoE layer."""
        for buffer, experts in zip(vllm_layers.buffers_of(self.model_runner.model), hot, strict=False):
            buffer.set_hot(experts)
