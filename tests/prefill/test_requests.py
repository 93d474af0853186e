"""Sampling options as they travel to the engines: what an engine call that goes on after
tokens sampled elsewhere (the prefill engine's first, a failed replica's) is asked for."""

from __future__ import annotations

import pytest

from pdserve.controller.decision import SLO
from pdserve.prefill.requests import GenerateRequest, Sampling


@pytest.mark.parametrize(("min_tokens", "sampled", "max_tokens", "left"), [
    (5, 0, 1, 1),  # the prefill engine's one token: no end of sequence there
    (5, 1, 31, 4),  # the decode engine goes on after it
    (5, 7, 20, 0),  # a resumed answer already past min_tokens
    (0, 3, 10, 0),
])
def test_min_tokens_carry_over_as_what_is_left_within_the_call(min_tokens, sampled, max_tokens, left):
    assert Sampling(max_tokens=32, min_tokens=min_tokens).remaining_min_tokens(sampled, max_tokens) == left


def test_a_continued_request_keeps_every_stateless_sampling_option():
    sampling = Sampling(max_tokens=10, top_k=3, min_p=0.2, repetition_penalty=1.1, min_tokens=4,
                        stop_token_ids=[7], logit_bias={5: -3.0}, seed=1, temperature=0.5)
    cont = GenerateRequest("r", [1, 2], sampling, SLO(ttft_ms=1, tpot_ms=1, priority=0)).continued([9, 8])
    assert cont.sampling == sampling.model_copy(update={"max_tokens": 8}) and cont.sampled_tokens == 2
    assert cont.sampling.remaining_min_tokens(cont.sampled_tokens, 8) == 2
