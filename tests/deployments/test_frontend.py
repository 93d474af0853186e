"""The ingress frontend's validation with the default model's real tokenizer: what is
refused before any engine is asked, and how defaults are filled in."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdserve.config.cluster import parse_config
from pdserve.deployments.frontend import Frontend
from pdserve.deployments.prompt_limits import MAX_CHARS_PER_TOKEN
from pdserve.errors import InvalidRequest, ModelNotFound
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import Sampling

pytestmark = pytest.mark.slow  # needs the default model's checkpoint (make model)


@pytest.fixture(scope="module")
def frontend():
    return Frontend(parse_config({"max_model_len": 64}), str(resolve_model(None)), controller=None, pools={})


async def test_chat_goes_through_the_chat_template(frontend):
    req = await frontend.chat_request([{"role": "user", "content": "Hi"}], Sampling(max_tokens=4))
    text = frontend.requests.tokenizer.decode(req.prompt_token_ids)
    assert "Hi" in text and text.rstrip().endswith("assistant")


async def test_max_tokens_defaults_to_the_room_left_in_the_context(frontend):
    req = await frontend.completion_request("Hello there", Sampling())
    assert req.sampling.max_tokens == 64 - len(req.prompt_token_ids)


async def test_prompt_plus_max_tokens_beyond_the_context_is_refused_with_the_numbers(frontend):
    with pytest.raises(InvalidRequest, match="maximum context length is 64") as err:
        await frontend.completion_request("Hello there", Sampling(max_tokens=100))
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequest, match="leaving no room"):
        await frontend.completion_request("word " * 100, Sampling())


async def test_empty_prompts_and_out_of_vocabulary_token_ids_are_refused(frontend):
    with pytest.raises(InvalidRequest, match="empty"):
        await frontend.completion_request("", Sampling())
    with pytest.raises(InvalidRequest, match="token ids"):
        await frontend.completion_request([1, 2, 10**9], Sampling())
    assert (await frontend.completion_request([1, 2, 3], Sampling(max_tokens=1))).prompt_token_ids == [1, 2, 3]


@pytest.mark.parametrize("field", ["stop_token_ids", "logit_bias"])
async def test_token_ids_beyond_the_vocabulary_in_sampling_fields_are_refused_naming_the_field(frontend, field):
    vocab = len(frontend.requests.tokenizer)
    ids = [vocab] if field == "stop_token_ids" else {vocab: 5.0}
    with pytest.raises(InvalidRequest) as err:
        await frontend.completion_request("Hi", Sampling(max_tokens=2, **{field: ids}))
    assert err.value.param == field and f"[0, {vocab})" in err.value.message
    inside = [vocab - 1] if field == "stop_token_ids" else {vocab - 1: 5.0}
    assert getattr((await frontend.completion_request("Hi", Sampling(max_tokens=2, **{field: inside}))).sampling,
                   field) == inside


async def test_unknown_model_is_not_found(frontend):
    frontend.check_model("SmolLM2-135M-Instruct")
    with pytest.raises(ModelNotFound):
        frontend.check_model("gpt-4")


async def test_refusals_are_counted_by_outcome(frontend):
    with pytest.raises(InvalidRequest):
        await frontend.completion_request("", Sampling())
    text = (await frontend.metrics_text())[0].decode()
    assert 'pdserve_requests_total{outcome="invalid"}' in text


async def test_the_context_is_filled_to_the_last_token_and_not_one_beyond(frontend):
    assert (await frontend.completion_request([1] * 63, Sampling(max_tokens=1))).sampling.max_tokens == 1
    for ids, max_tokens in (([1] * 63, 2), ([1] * 2, 2**63 - 1), ([1] * 64, None), ([1] * 10_000, 1)):
        with pytest.raises(InvalidRequest) as err:
            await frontend.completion_request(ids, Sampling(max_tokens=max_tokens))
        assert err.value.code == "context_length_exceeded" and "maximum context length is 64" in err.value.message


async def test_no_messages_and_negative_token_ids_are_refused_naming_the_field(frontend):
    with pytest.raises(InvalidRequest) as err:
        await frontend.chat_request([], Sampling())
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequest, match=r"\[-1\]") as err:
        await frontend.completion_request([5, -1], Sampling())
    assert err.value.param == "prompt"


@pytest.mark.parametrize("call", [
    lambda fe: fe.completion_request("a lone surrogate \ud800 here", Sampling()),
    lambda fe: fe.chat_request([{"role": "user", "content": "hi \udfff"}], Sampling()),
    lambda fe: fe.completion_request("fine", Sampling(stop=["\ud800"])),
], ids=["completion_prompt", "chat_message", "stop_string"])
async def test_text_with_a_lone_surrogate_is_a_400_naming_the_field_not_a_tokenizer_crash(frontend, call):
    with pytest.raises(InvalidRequest, match="not valid text") as err:
        await call(frontend)
    assert err.value.param in ("prompt", "messages", "stop")


async def test_texts_and_message_counts_no_context_could_hold_are_refused_before_tokenizing(frontend, monkeypatch):
    calls = []
    monkeypatch.setattr(frontend.requests, "tokenizer", _CountingTokenizer(frontend.requests.tokenizer, calls))
    huge = "x" * (64 * MAX_CHARS_PER_TOKEN + 1)
    with pytest.raises(InvalidRequest, match="characters") as err:
        await frontend.completion_request(huge, Sampling())
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest, match="characters"):
        await frontend.chat_request([{"role": "user", "content": huge}], Sampling())
    with pytest.raises(InvalidRequest, match="65 messages"):
        await frontend.chat_request([{"role": "user", "content": "hi"}] * 65, Sampling())
    assert calls == []


async def test_a_prompt_is_tokenized_off_the_event_loop(frontend, monkeypatch):
    """The tokenizer waits for an event only this loop sets: tokenizing on the loop would wait in vain."""
    released, seen = threading.Event(), []
    monkeypatch.setattr(frontend.requests, "tokenizer", _CountingTokenizer(frontend.requests.tokenizer, seen, wait_for=released))
    request = asyncio.ensure_future(frontend.completion_request("Hello there", Sampling(max_tokens=1)))
    await asyncio.sleep(0)  # the request starts, and reaches the tokenizer
    released.set()
    await request
    assert seen == ["encode after the loop went on"]


class _CountingTokenizer:
    """The real tokenizer, recording each call; with `wait_for`, a call first waits (up to 5 s)
    for that event and records whether it came."""

    def __init__(self, real, calls: list, wait_for: threading.Event | None = None):
        self.real, self.calls, self.wait_for = real, calls, wait_for

    def _record(self, name: str) -> None:
        if self.wait_for is None:
            self.calls.append(name)
        else:
            came = self.wait_for.wait(timeout=5)
            self.calls.append(f"{name} after the loop went on" if came else f"{name} with the loop stalled")

    def encode(self, *args, **kwargs):
        self._record("encode")
        return self.real.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self._record("apply_chat_template")
        return self.real.apply_chat_template(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.real)
