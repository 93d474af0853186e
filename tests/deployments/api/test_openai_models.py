"""pdserve's OpenAI request models: what they honour, what they refuse (naming the field), and
the sampling options they hand on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pdserve.deployments.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    invalid_request,
    readme_field_table,
)
from pdserve.errors import InvalidRequest
from pdserve.prefill.requests import Sampling

MODEL = "served-model"
HI = [{"role": "user", "content": "hi"}]


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": HI, **fields})


def _completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", **fields})




def test_fields_that_ask_for_nothing_are_accepted_and_honoured_fields_kept() -> None:
    req = _chat(temperature=0, top_p=0.5, seed=7, stop="\n", user="u1", length_penalty=1.0, bad_words=None,
                tools=None, n=1, logprobs=False, tool_choice="none", echo=False, top_k=5, min_p=0.1,
                repetition_penalty=1.2, stop_token_ids=[2], logit_bias={"42": -100}, presence_penalty=0.5,
                frequency_penalty=-1)
    assert req.message_dicts() == HI
    assert req.sampling() == Sampling(temperature=0.0, top_p=0.5, seed=7, stop=["\n"], top_k=5, min_p=0.1,
                                      repetition_penalty=1.2, stop_token_ids=[2], logit_bias={42: -100.0},
                                      presence_penalty=0.5, frequency_penalty=-1.0)
    assert _chat(min_tokens=3, max_tokens=4).sampling().min_tokens == 3


VLLMS = "vLLM's field, not supported by pdserve"


@pytest.mark.parametrize(("make", "fields", "param", "says"), [
    (_chat, {"length_penalty": 0.5}, "length_penalty", VLLMS),
    (_chat, {"bad_words": ["x"]}, "bad_words", VLLMS),
    (_chat, {"use_beam_search": True}, "use_beam_search", VLLMS),
    (_chat, {"prompt_logprobs": 1}, "prompt_logprobs", VLLMS),
    (_chat, {"tools": [{"type": "function", "function": {"name": "f", "defer_loading": True}}]},
     "tools[0].function.defer_loading", "unknown field"),
    (_chat, {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", VLLMS),
    (_chat, {"response_format": {"type": "structural_tag"}}, "response_format.type", "'json_schema'"),
    (_chat, {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format", "only then"),
    (_chat, {"request_id": "mine"}, "request_id", VLLMS),
    # The chat template adds what it needs; vLLM's chat default is false, so true asks for more.
    (_chat, {"add_special_tokens": True}, "add_special_tokens", VLLMS),
    (_chat, {"temprature": 0}, "temprature", "unknown field"),
    (_chat, {"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages[0].name", "unknown field"),
    (_chat, {"messages": [{"role": "function", "content": "42"}]}, "messages[0].role", "'system'"),
    (_chat, {"messages": [{"role": "tool", "content": "42"}]}, "messages[0]", "names its tool_call_id"),
    (_chat, {"messages": [{"role": "user", "content": None}]}, "messages[0]", "content is null only"),
    (_completion, {"best_of": 2}, "best_of", "unknown field"),
    (_completion, {"suffix": "x"}, "suffix", VLLMS), (_completion, {"add_special_tokens": False}, "add_special_tokens", VLLMS),
])
def test_a_field_pdserve_does_not_honour_is_refused_by_name(make, fields: dict, param: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make(**fields)
    err = invalid_request(caught.value.errors())
    assert err.param == param and err.http_status == 400
    assert f"'{param}'" in err.message and says in err.message


SCHEMA = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}


@pytest.mark.parametrize(("fields", "constraint"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA, "strict": True}}},
     {"json_schema": SCHEMA}),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"structured_outputs": {"json": '{"type": "string"}'}}, {"json_schema": {"type": "string"}}),
    ({"structured_outputs": {"choice": ["yes", "no"], "disable_any_whitespace": False}}, {"choice": ["yes", "no"]}),
    ({"structured_outputs": {"regex": "[0-9]+", "structural_tag": None}}, {"regex": "[0-9]+"}),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, {"grammar": 'root ::= "a" | "b"'}),
])
def test_response_format_and_structured_outputs_become_one_constraint(fields: dict, constraint: dict) -> None:
    for make in (_chat, _completion):
        structured = make(**fields).sampling().structured
        assert structured is not None and structured.model_dump(exclude_defaults=True) == constraint
    assert _chat(response_format={"type": "text"}).sampling().structured is None


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "bogus"}}}},
     "response_format", 'Unsupported type "bogus"'),
    ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs", "Unclosed '['"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs", "Invalid grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1 item"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one constraint"),
    ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs", "exactly one constraint"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "both constrain"),
])
def test_a_constraint_xgrammar_cannot_compile_is_refused_at_the_ingress(fields: dict, param: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _chat(**fields).sampling()
    assert caught.value.param == param and says in caught.value.message, caught.value.message
    assert "cpp" not in caught.value.message  # xgrammar's source line is of no use to a client


def test_the_readme_field_table_is_the_one_the_code_generates() -> None:
    table = readme_field_table()
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    assert table in readme, "regenerate the README's field table: python -m pdserve.deployments.api.openai_models"
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert rows["top_k"].endswith("| honoured | honoured |")
    assert rows["length_penalty"].endswith("| refused unless null or 1.0 | refused unless null or 1.0 |")
    assert rows["suffix"].endswith("| - | refused unless null |") and "pdserve's" in rows["ttft_ms"]


@pytest.mark.parametrize("fields", [
    {"max_tokens": "5"}, {"max_tokens": 5.0}, {"temperature": "0.5"}, {"stream": "true"}, {"stream": 1},
    {"seed": "1"}, {"stop": 5}, {"stop": ["a", 1]}, {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "bot", "content": "hi"}]}, {"messages": [{"role": "user"}]}, {"messages": []},
    {"model": 1}, {"stream_options": {"include_usage": "yes"}, "stream": True},
])
def test_chat_request_rejects_known_fields_of_the_wrong_type(fields: dict) -> None:
    with pytest.raises(ValidationError):
        _chat(**fields)


def test_stop_is_a_string_or_a_list() -> None:
    assert _chat(stop="END").sampling().stop == ["END"]
    assert _chat(stop=["a", "b"]).sampling().stop == ["a", "b"]
    assert _chat(stop=None).sampling().stop == []


def test_max_completion_tokens_is_max_tokens() -> None:
    assert _chat(max_completion_tokens=7).sampling().max_tokens == 7
    assert _chat(max_tokens=7).sampling().max_tokens == 7
    assert _chat(max_tokens=7, max_completion_tokens=7).sampling().max_tokens == 7
    assert _chat().sampling().max_tokens is None  # the frontend fills in the room left in the context
    with pytest.raises(InvalidRequest) as caught:
        _chat(max_tokens=7, max_completion_tokens=8).sampling()
    assert caught.value.param == "max_completion_tokens"


def test_stream_options_need_a_stream() -> None:
    with pytest.raises(ValidationError, match="only allowed when stream is true"):
        _chat(stream_options={"include_usage": True})
    assert _chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not _chat(stream=True).include_usage


def test_completion_prompt_forms() -> None:
    assert _completion(prompt="hi").prompt_input() == "hi"
    assert _completion(prompt=[1, 2, 3]).prompt_input() == [1, 2, 3]
    assert _completion(prompt=["hi"]).prompt_input() == "hi"
    for prompt in (["a", "b"], [], [[1, 2]], 5, ["a", 1]):
        with pytest.raises(ValidationError, match="prompt"):
            _completion(prompt=prompt)


def test_completion_defaults_to_16_tokens_like_openai() -> None:
    assert _completion().sampling().max_tokens == 16
    assert _completion(max_tokens=None).sampling().max_tokens == 16
    assert _completion(max_tokens=3).sampling().max_tokens == 3


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["x" * 257]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"max_tokens": -1}, "max_tokens"),
    # Beyond int64: vLLM's engine would fail seeding its generator, and the whole engine with it.
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    # vLLM skips stop strings in the first min_tokens; across an engine seam pdserve could not.
    ({"min_tokens": 2, "stop": "x"}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"logit_bias": {"1": 100.5}}, "logit_bias"), ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
])
def test_sampling_errors_name_the_request_field(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _chat(**fields).sampling()
    assert caught.value.param == param
    assert caught.value.http_status == 400
    assert f"'{param}'" in caught.value.message and "Value error" not in caught.value.message


def test_text_parts_are_joined_and_developer_is_the_system_role() -> None:
    req = _chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                          {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}])
    assert req.message_dicts() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    for content in ([{"type": "image_url", "image_url": {"url": "http://x"}}], [{"type": "text"}], [{"text": "x"}], 3):
        with pytest.raises(ValidationError) as caught:
            _chat(messages=[{"role": "user", "content": content}])
        err = invalid_request(caught.value.errors())
        assert err.param == "messages[0].content" and "list of" in err.message


@pytest.mark.parametrize(("make", "fields", "value", "param"), [
    (_chat, {"logprobs": True}, 0, None), (_chat, {"logprobs": True, "top_logprobs": 5}, 5, None),
    (_chat, {"logprobs": False}, None, None), (_chat, {"top_logprobs": 2}, None, "top_logprobs"),
    (_chat, {"logprobs": True, "top_logprobs": 21}, None, "top_logprobs"),
    (_completion, {"logprobs": 0}, 0, None), (_completion, {"logprobs": 3}, 3, None),
    (_completion, {"logprobs": -1}, None, "logprobs"),
])
def test_logprobs_fields_become_the_number_of_alternatives_or_a_400(make, fields, value, param) -> None:
    if param is None:
        assert make(**fields).sampling().logprobs == value
    else:
        with pytest.raises(InvalidRequest) as caught:
            make(**fields).sampling()
        assert caught.value.param == param


def test_ignore_eos_reaches_the_sampling_options() -> None:
    assert _completion(ignore_eos=True).sampling().ignore_eos is True
    assert _chat().sampling().ignore_eos is False
