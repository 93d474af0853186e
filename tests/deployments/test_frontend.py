"""The ingress frontend's validation with the default model's real tokenizer: what is
refused before any engine is asked, and how defaults are filled in."""

from __future__ import annotations

import pytest

from pdserve.config.cluster import parse_config
from pdserve.deployments.frontend import Frontend
from pdserve.errors import InvalidRequest, ModelNotFound
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import Sampling

pytestmark = pytest.mark.slow  # needs the default model's checkpoint (make model)


@pytest.fixture(scope="module")
def frontend():
    return Frontend(parse_config({"max_model_len": 64}), str(resolve_model(None)), controller=None, pools={})


def test_chat_goes_through_the_chat_template(frontend):
    req = frontend.chat_request([{"role": "user", "content": "Hi"}], Sampling(max_tokens=4))
    text = frontend.tokenizer.decode(req.prompt_token_ids)
    assert "Hi" in text and text.rstrip().endswith("assistant")


def test_max_tokens_defaults_to_the_room_left_in_the_context(frontend):
    req = frontend.completion_request("Hello there", Sampling())
    assert req.sampling.max_tokens == 64 - len(req.prompt_token_ids)


def test_prompt_plus_max_tokens_beyond_the_context_is_refused_with_the_numbers(frontend):
    with pytest.raises(InvalidRequest, match="maximum context length is 64") as err:
        frontend.completion_request("Hello there", Sampling(max_tokens=100))
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequest, match="leaving no room"):
        frontend.completion_request("word " * 100, Sampling())


def test_empty_prompts_and_out_of_vocabulary_token_ids_are_refused(frontend):
    with pytest.raises(InvalidRequest, match="empty"):
        frontend.completion_request("", Sampling())
    with pytest.raises(InvalidRequest, match="token ids"):
        frontend.completion_request([1, 2, 10**9], Sampling())
    assert frontend.completion_request([1, 2, 3], Sampling(max_tokens=1)).prompt_token_ids == [1, 2, 3]


def test_unknown_model_is_not_found(frontend):
    frontend.check_model("SmolLM2-135M-Instruct")
    with pytest.raises(ModelNotFound):
        frontend.check_model("gpt-4")


def test_refusals_are_counted_by_outcome(frontend):
    with pytest.raises(InvalidRequest):
        frontend.completion_request("", Sampling())
    text = frontend.metrics_text()[0].decode()
    assert 'pdserve_requests_total{outcome="invalid"}' in text


def test_the_context_is_filled_to_the_last_token_and_not_one_beyond(frontend):
    assert frontend.completion_request([1] * 63, Sampling(max_tokens=1)).sampling.max_tokens == 1
    for ids, max_tokens in (([1] * 63, 2), ([1] * 2, 2**63 - 1), ([1] * 64, None), ([1] * 10_000, 1)):
        with pytest.raises(InvalidRequest) as err:
            frontend.completion_request(ids, Sampling(max_tokens=max_tokens))
        assert err.value.code == "context_length_exceeded" and "maximum context length is 64" in err.value.message


def test_no_messages_and_negative_token_ids_are_refused_naming_the_field(frontend):
    with pytest.raises(InvalidRequest) as err:
        frontend.chat_request([], Sampling())
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequest, match=r"\[-1\]") as err:
        frontend.completion_request([5, -1], Sampling())
    assert err.value.param == "prompt"
