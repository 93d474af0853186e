"""Methods vLLM mixes into every worker of a pdserve engine (`worker_extension_cls`), called by
name through the engine's `collective_rpc`.

An answer that goes on on another engine (the prefill engine sampled its first token, or the
replica serving it died mid-answer) must be sampled as one uninterrupted run would have been,
though its first k tokens reach the new engine as the end of its prompt. Importing this module
(vLLM imports it in each worker) wraps the model runner's state update, so that a new request
whose `extra_args` hold `pdserve_sampled_tokens: k`
- has its seeded generator moved past k steps, by running the engine's own sampler k times on a
  dummy row: the same draws, whichever path the platform samples with (CPU, PyTorch,
  FlashInfer's fallback);
- has those k tokens counted as its output by the presence and frequency penalties (wrapping
  the sampler's penalty step): the same counts, so the same logits, as one run. (Repetition
  penalty counts prompt and output alike, and min_tokens is carried by the caller.)

It also keeps a seeded request alive through a chunked prefill on CPUs: vLLM samples every row
each step and, for a prompt not yet whole, discards the token and rewinds the request's generator
with `set_offset`, which only CUDA's Philox generators have ("CPU Generator does not use offset"
killed the engine). A CPU generator's state is saved before such a step's sampling and put back
after it instead, so the step draws nothing, as vLLM means it to.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pdserve.experts.worker_extension import ExpertBufferExtension
from pdserve.prefill.requests import SAMPLED_TOKENS_KEY

log = logging.getLogger(__name__)

EXTENSION = "pdserve.prefill.worker_extension.EngineWorkerExtension"

_EARLIER_OUTPUT: dict[int, tuple[list[int], list[int]]] = {}
"""id() of a running request's output-token list -> (that list, the answer's tokens sampled before
this engine). The list itself is held so that its id cannot be reused while the entry lives."""
_EARLIER_OUTPUT_OF: dict[str, int] = {}
"""Request id -> its key in `_EARLIER_OUTPUT`, to drop the entry when the request finishes."""


def advance_generator(runner: Any, generator: Any, steps: int) -> None:
    """Draw from `generator` what `steps` sampling steps of one request draw on `runner`."""
    import torch

    row = torch.zeros(1, runner.model_config.get_vocab_size(), dtype=torch.float32, device=runner.device)
    for _ in range(steps):
        runner.sampler.topk_topp_sampler(row.clone(), {0: generator}, None, None)


def _continuing_answers(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output: Any) -> Any:
        for req_id in scheduler_output.finished_req_ids:
            _EARLIER_OUTPUT.pop(_EARLIER_OUTPUT_OF.pop(req_id, -1), None)
        result = original(self, scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            steps = int((sp.extra_args or {}).get(SAMPLED_TOKENS_KEY, 0)) if sp is not None else 0
            state = self.requests.get(new.req_id)
            if steps <= 0 or state is None:
                continue
            if state.generator is not None:
                advance_generator(self, state.generator, steps)
            if sp.presence_penalty or sp.frequency_penalty:
                out = state.output_token_ids
                _EARLIER_OUTPUT[id(out)] = (out, list(state.prompt_token_ids[-steps:]))
                _EARLIER_OUTPUT_OF[new.req_id] = id(out)
        return result

    _update_states.pdserve_wrapped = True
    return _update_states


def _counting_earlier_output(original):
    @functools.wraps(original)
    def apply_penalties(logits: Any, sampling_metadata: Any, output_token_ids: list[list[int]]) -> Any:
        if _EARLIER_OUTPUT and not sampling_metadata.no_penalties:
            output_token_ids = [entry[1] + out if (entry := _EARLIER_OUTPUT.get(id(out))) and entry[0] is out else out
                                for out in output_token_ids]
        return original(logits, sampling_metadata, output_token_ids)

    apply_penalties.pdserve_wrapped = True
    return staticmethod(apply_penalties)


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    """Batch row -> CPU generator of each seeded request whose token this step discards (a prefill
    chunk that does not end its prompt)."""
    import numpy as np

    rows = np.nonzero(runner.discard_request_mask.np[:runner.input_batch.num_reqs])[0]
    generators = runner.input_batch.generators
    return {int(i): g for i in rows if (g := generators.get(int(i))) is not None and g.device.type == "cpu"}


def _saving_discarded_draws(original):
    @functools.wraps(original)
    def _sample(self, *args: Any, **kwargs: Any) -> Any:
        self.pdserve_rewinds = {i: (g, g.get_state()) for i, g in _discarded_cpu_generators(self).items()}
        return original(self, *args, **kwargs)

    _sample.pdserve_wrapped = True
    return _sample


def _rewinding_cpu_generators(original):
    @functools.wraps(original)
    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        rewinds, self.pdserve_rewinds = getattr(self, "pdserve_rewinds", {}), {}
        generators = self.input_batch.generators
        for i, (generator, _) in rewinds.items():  # out of vLLM's reach: it would call set_offset
            if generators.get(i) is generator:
                del generators[i]
        try:
            return original(self, *args, **kwargs)
        finally:
            for i, (generator, state) in rewinds.items():
                generator.set_state(state)
                generators[i] = generator

    _bookkeeping_sync.pdserve_wrapped = True
    return _bookkeeping_sync


def _wrap_model_runner() -> None:
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, wrap in (("_update_states", _continuing_answers), ("_sample", _saving_discarded_draws),
                       ("_bookkeeping_sync", _rewinding_cpu_generators)):
        current = getattr(GPUModelRunner, name)
        if not getattr(current, "pdserve_wrapped", False):
            setattr(GPUModelRunner, name, wrap(current))
    penalties = Sampler.apply_penalties
    if not getattr(penalties, "pdserve_wrapped", False):
        Sampler.apply_penalties = _counting_earlier_output(penalties)


_wrap_model_runner()


class EngineWorkerExtension(ExpertBufferExtension):
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's model runner."""

    def pdserve_continues_answers(self) -> bool:
        """Whether this worker's model runner is the one whose state update and sampler are
        wrapped (vLLM's second-generation GPU runner is not)."""
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return isinstance(self.model_runner, GPUModelRunner)

    def pdserve_discard_kv_transfer(self, transfer_id: str, src_tp: int = 1) -> bool:
        """Free a prompt's KV that arrived (or is arriving) for an answer that ended at its first
        token, this rank's parts of it from a prefill engine of `src_tp` ranks: no request will load
        it. False on an engine without pdserve's connector."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        from pdserve.kvtransfer.connector import GrpcKVConnector

        connector = get_kv_transfer_group() if has_kv_transfer_group() else None
        if not isinstance(connector, GrpcKVConnector):
            return False
        return connector.discard_transfer(transfer_id, src_tp)
