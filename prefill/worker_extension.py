"""Methods vLLM mixes into every worker of a pdserve engine (`worker_extension_cls`), called by
name through the engine's `collective_rpc`.

A seeded answer that goes on on another engine (the prefill engine sampled its first token, or
the replica serving it died mid-answer) must draw what one uninterrupted run would have drawn.
vLLM seeds a request's generator when the request reaches the worker, and every sampling step
draws from it; so importing this module (vLLM imports it in each worker) wraps the model
runner's state update: a new request whose `extra_args` hold `pdserve_sampled_tokens: k` has its
generator moved past k steps, by running the engine's own sampler k times on a dummy row. The
same draws, whichever path the platform samples with (CPU, PyTorch, FlashInfer's fallback).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pdserve.experts.worker_extension import ExpertBufferExtension

log = logging.getLogger(__name__)

SAMPLED_TOKENS_KEY = "pdserve_sampled_tokens"
"""`SamplingParams.extra_args` entry: tokens of this answer already sampled (elsewhere)."""

EXTENSION = "pdserve.prefill.worker_extension.EngineWorkerExtension"


def advance_generator(runner: Any, generator: Any, steps: int) -> None:
    """Draw from `generator` what `steps` sampling steps of one request draw on `runner`."""
    import torch

    row = torch.zeros(1, runner.model_config.get_vocab_size(), dtype=torch.float32, device=runner.device)
    for _ in range(steps):
        runner.sampler.topk_topp_sampler(row.clone(), {0: generator}, None, None)


def _continuing_seeds(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output: Any) -> Any:
        result = original(self, scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            steps = int((sp.extra_args or {}).get(SAMPLED_TOKENS_KEY, 0)) if sp is not None else 0
            state = self.requests.get(new.req_id)
            if steps > 0 and state is not None and state.generator is not None:
                advance_generator(self, state.generator, steps)
        return result

    _update_states.pdserve_wrapped = True
    return _update_states


def _wrap_update_states() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    current = GPUModelRunner._update_states
    if not getattr(current, "pdserve_wrapped", False):
        GPUModelRunner._update_states = _continuing_seeds(current)


_wrap_update_states()


class EngineWorkerExtension(ExpertBufferExtension):
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's model runner."""

    def pdserve_continues_seeds(self) -> bool:
        """Whether this worker's model runner is the one whose state update is wrapped (vLLM's
        second-generation GPU runner is not)."""
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return isinstance(self.model_runner, GPUModelRunner)

    def pdserve_discard_kv_transfer(self, transfer_id: str) -> bool:
        """Free a prompt's KV that arrived (or is arriving) for an answer that ended at its first
        token: no request will load it. False on an engine without pdserve's connector."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        from pdserve.kvtransfer.connector import GrpcKVConnector

        connector = get_kv_transfer_group() if has_kv_transfer_group() else None
        if not isinstance(connector, GrpcKVConnector):
            return False
        return connector.discard_transfer(transfer_id)
