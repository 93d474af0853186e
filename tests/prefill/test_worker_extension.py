"""The worker extension's penalties for an answer that goes on on a new engine: its tokens
sampled earlier (now the end of the prompt) count as output, as in one uninterrupted run.
vLLM's own sampler computes the penalties; the model runner and its scheduler output are
stand-ins holding only the fields the extension reads."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.sampler import Sampler

from pdserve.prefill.requests import SAMPLED_TOKENS_KEY
from pdserve.prefill.worker_extension import (
    _continuing_answers,
    _rewinding_cpu_generators,
    _saving_discarded_draws,
)

VOCAB = 8


def _penalised(output_token_ids: list[list[int]], prompt: list[int]) -> torch.Tensor:
    meta = SimpleNamespace(no_penalties=False, prompt_token_ids=torch.tensor([prompt]),
                           presence_penalties=torch.tensor([0.5]), frequency_penalties=torch.tensor([1.0]),
                           repetition_penalties=torch.tensor([1.2]))
    return Sampler.apply_penalties(torch.linspace(-1, 1, VOCAB).unsqueeze(0), meta, output_token_ids)


def test_tokens_sampled_before_the_engine_count_as_output_until_the_request_finishes():
    one_run = _penalised([[5, 3, 3]], prompt=[1, VOCAB, VOCAB])  # prompt [1], the answer 5 3 3 on one engine
    out = [3]  # the new engine's own output, after 5 3 reached it as prompt
    fake_runner = SimpleNamespace(requests={"r": SimpleNamespace(generator=None, output_token_ids=out,
                                                                 prompt_token_ids=[1, 5, 3])})
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.2,
                            extra_args={SAMPLED_TOKENS_KEY: 2})
    update = _continuing_answers(lambda runner, scheduler_output: None)
    update(fake_runner, SimpleNamespace(finished_req_ids=set(),
                                        scheduled_new_reqs=[SimpleNamespace(req_id="r", sampling_params=params)]))
    assert torch.equal(_penalised([out], prompt=[1, 5, 3]), one_run)

    update(fake_runner, SimpleNamespace(finished_req_ids={"r"}, scheduled_new_reqs=[]))
    assert not torch.equal(_penalised([out], prompt=[1, 5, 3]), one_run)  # forgotten once finished


def _batch() -> SimpleNamespace:
    """Two seeded requests: row 0 prefills a chunk that does not end its prompt (its token is
    discarded), row 1 decodes."""
    batch = SimpleNamespace(num_reqs=2, generators={0: torch.Generator().manual_seed(7),
                                                    1: torch.Generator().manual_seed(9)})
    return SimpleNamespace(input_batch=batch, discard_request_mask=SimpleNamespace(np=np.array([True, False])))


def _vllm_sample(runner) -> None:
    """vLLM's sampler draws from every row's generator."""
    for generator in runner.input_batch.generators.values():
        torch.rand(4, generator=generator)


def _vllm_bookkeeping(runner) -> None:
    """vLLM's rewind of a discarded row's draw (`GPUModelRunner._bookkeeping_sync`)."""
    for i in np.nonzero(runner.discard_request_mask.np[:runner.input_batch.num_reqs])[0]:
        generator = runner.input_batch.generators.get(int(i))
        if generator is not None:
            generator.set_offset(generator.get_offset() - 4)


def test_a_seeded_prompt_chunk_whose_token_is_discarded_draws_nothing_from_its_cpu_generator():
    with pytest.raises(RuntimeError, match="does not use offset"):  # vLLM alone: the engine died of it
        runner = _batch()
        _vllm_sample(runner)
        _vllm_bookkeeping(runner)
    runner = _batch()
    discarded, decoding = runner.input_batch.generators[0], runner.input_batch.generators[1]
    _saving_discarded_draws(lambda r: _vllm_sample(r))(runner)
    _rewinding_cpu_generators(lambda r: _vllm_bookkeeping(r))(runner)
    assert runner.input_batch.generators == {0: discarded, 1: decoding}
    first_draw = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(4, generator=discarded), first_draw)  # as if the chunk drew nothing
    fresh = torch.Generator().manual_seed(9)
    torch.rand(4, generator=fresh)
    assert torch.equal(torch.rand(4, generator=decoding), torch.rand(4, generator=fresh))  # its draw stands
