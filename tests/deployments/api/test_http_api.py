"""Tests for the OpenAI HTTP API's request models and error answers. No engine runs here: the
frontends below refuse every request (wrong model, prompt too long, no capacity), fail outright, or
answer with fixed chunks; answers with generated text are covered by the end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from pdserve.deployments.api.http_api import build_http_app
from pdserve.deployments.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    invalid_request,
    readme_field_table,
)
from pdserve.errors import InvalidRequest, ModelNotFound, Overloaded
from pdserve.prefill.requests import (
    SLO,
    GenerateChunk,
    GenerateRequest,
    Objectives,
    Sampling,
    SLOReport,
    TokenLogprob,
)

MODEL = "served-model"
HI = [{"role": "user", "content": "hi"}]


class FakeRejectingFrontend:
    """A fake of the engine-backed frontend for the HTTP layer's own tests: checks the model
    name, then rejects every prompt (as the real one does for a prompt beyond the context)
    and records what it was handed. It never produces text; generation is tested end to
    end against real engines (test_service_e2e.py)."""

    model_name = MODEL
    max_model_len = 2048
    max_body_bytes = 64 << 10

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.keys_seen: list[str | None] = []
        self.registry = CollectorRegistry()
        Counter("pdserve_test_requests", "requests seen", registry=self.registry).inc()

    def authorize(self, api_key: str | None) -> None:
        self.keys_seen.append(api_key)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFound(model, self.model_name)

    async def chat_request(self, messages: list[dict[str, str]], sampling: Sampling,
                     trace_carrier: dict[str, str] | None = None,
                     objectives: Objectives | None = None) -> GenerateRequest:
        self.calls.append({"messages": messages, "sampling": sampling, "trace_carrier": trace_carrier,
                           "objectives": objectives})
        raise InvalidRequest("the prompt does not fit the context", param="messages", code="context_length_exceeded")

    async def completion_request(self, prompt: str | list[int], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None,
                     objectives: Objectives | None = None) -> GenerateRequest:
        self.calls.append({"prompt": prompt, "sampling": sampling, "trace_carrier": trace_carrier,
                           "objectives": objectives})
        raise InvalidRequest("the prompt does not fit the context", param="prompt", code="context_length_exceeded")

    async def health(self) -> dict:
        return {"status": "unavailable", "prefill": 0, "decode": 0}

    async def metrics_text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class FakeNoCapacityFrontend(FakeRejectingFrontend):
    """Accepts requests but routes none, like a cluster at capacity: no text is ever generated."""

    async def chat_request(self, messages: list[dict[str, str]], sampling: Sampling,
                     trace_carrier: dict[str, str] | None = None,
                     objectives: Objectives | None = None) -> GenerateRequest:
        return GenerateRequest("0" * 32, [], sampling, SLO(1000, 100, 0), trace_carrier or {})

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        raise Overloaded("every decode instance is at its limit", retry_after_s=2.6)
        yield  # an async generator, like the real frontend's stream


# The decode replica's report of a transfer, as its connector returns it.
KV_REPORT = {"transfer_id": "t1", "state": "DONE", "tokens": 3, "bytes": 9216, "error": "", "prefill_compute_ms": 9.0,
             "exposed_ms": 4.25, "load_ms": 1.5, "trace_parent": "", "start_unix_ns": 1_000_000_000,
             "ready_unix_ns": 1_012_500_000}


class FakeAnsweringFrontend(FakeRejectingFrontend):
    """Answers every chat with two fixed chunks, the last with an SLO report: the HTTP layer's
    wire format of an answer, without an engine."""

    async def chat_request(self, messages: list[dict[str, str]], sampling: Sampling,
                     trace_carrier: dict[str, str] | None = None,
                     objectives: Objectives | None = None) -> GenerateRequest:
        return GenerateRequest("0" * 32, [1, 2, 3], sampling, SLO(500, 50, 0), trace_carrier or {})

    completion_request = chat_request

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        asked = req.sampling.logprobs is not None
        yield GenerateChunk("Hel", [10], 3, 1, logprobs=[TokenLogprob("Hel", -0.5, [("Hel", -0.5), ("Hi", -1.25)])]
                            if asked else None)
        yield GenerateChunk("lo", [11], 3, 2, "stop", slo=SLOReport(612.5, 30.0, SLO(500.0, 50.0, 0)),
                            kv_transfer=KV_REPORT,
                            logprobs=[TokenLogprob("lo", -9999.0, [("p", -0.01), ("lo", -9999.0)])] if asked else None)


class FakeBrokenFrontend(FakeRejectingFrontend):
    def check_model(self, model: str) -> None:
        raise RuntimeError("connection to 10.0.0.7 refused, token=s3cret")


def _client(frontend: FakeRejectingFrontend) -> TestClient:
    return TestClient(build_http_app(lambda: frontend), raise_server_exceptions=False)


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": HI, **fields})


def _completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", **fields})


def _assert_openai_error(body: dict, *, type_: str, param: str | None) -> str:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["param"] == param
    return body["error"]["message"]


# --- request models ------------------------------------------------------------------------------


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
    (_chat, {"n": 2}, "n", VLLMS), (_chat, {"prompt_logprobs": 1}, "prompt_logprobs", VLLMS),
    (_chat, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", VLLMS),
    (_chat, {"response_format": {"type": "json_object"}}, "response_format", VLLMS),
    (_chat, {"request_id": "mine"}, "request_id", VLLMS),
    # The chat template adds what it needs; vLLM's chat default is false, so true asks for more.
    (_chat, {"add_special_tokens": True}, "add_special_tokens", VLLMS),
    (_chat, {"temprature": 0}, "temprature", "unknown field"),
    (_chat, {"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages[0].name", "unknown field"),
    (_chat, {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0].role", "'system'"),
    (_completion, {"echo": True}, "echo", VLLMS), (_completion, {"best_of": 2}, "best_of", "unknown field"),
    (_completion, {"suffix": "x"}, "suffix", VLLMS), (_completion, {"add_special_tokens": False}, "add_special_tokens", VLLMS),
])
def test_a_field_pdserve_does_not_honour_is_refused_by_name(make, fields: dict, param: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make(**fields)
    err = invalid_request(caught.value.errors())
    assert err.param == param and err.http_status == 400
    assert f"'{param}'" in err.message and says in err.message


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


# --- HTTP errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": MODEL}, "messages", "Field required"),
    ({"model": MODEL, "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "'system'"),
    ({"model": MODEL, "messages": HI, "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"model": MODEL, "messages": HI, "n": 2}, "n", "not supported by pdserve"),
    ({"model": MODEL, "messages": HI, "tool_choice": "auto"}, "tool_choice", "not supported by pdserve"),
    ({"model": MODEL, "messages": HI, "stop": 3}, "stop", "list of strings"),
    ({"model": MODEL, "messages": HI, "temperature": 9}, "temperature", "less than or equal to 2"),
    ([HI], None, "valid dictionary"),
])
def test_invalid_chat_bodies_are_400_with_openai_error(body: Any, param: str | None, words: str) -> None:
    resp = _client(FakeRejectingFrontend()).post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    message = _assert_openai_error(resp.json(), type_="invalid_request_error", param=param)
    assert words in message


def test_invalid_completion_body_is_400() -> None:
    resp = _client(FakeRejectingFrontend()).post("/v1/completions", json={"model": MODEL, "prompt": "hi", "echo": True})
    assert resp.status_code == 400
    assert "not supported by pdserve" in _assert_openai_error(resp.json(), type_="invalid_request_error", param="echo")


@pytest.mark.parametrize(("content", "content_type", "words"), [
    (b'{"model": "x", ', "application/json", "not valid JSON"),
    (b'{"model": "x"}', "text/plain", "Content-Type: application/json"),
    (b"", "application/json", "Field required"),
])
def test_unreadable_bodies_are_400(content: bytes, content_type: str, words: str) -> None:
    resp = _client(FakeRejectingFrontend()).post("/v1/chat/completions", content=content,
                                              headers={"content-type": content_type})
    assert resp.status_code == 400
    assert words in _assert_openai_error(resp.json(), type_="invalid_request_error", param=None)


def test_unknown_model_is_404() -> None:
    resp = _client(FakeRejectingFrontend()).post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert resp.status_code == 404
    message = _assert_openai_error(resp.json(), type_="invalid_request_error", param="model")
    assert resp.json()["error"]["code"] == "model_not_found" and MODEL in message


def test_frontend_rejection_keeps_its_status_and_sees_trace_context() -> None:
    frontend = FakeRejectingFrontend()
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k=v"}
    resp = _client(frontend).post("/v1/chat/completions", headers=headers,
                                  json={"model": MODEL, "messages": HI, "max_completion_tokens": 4, "stream": True})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    [call] = frontend.calls
    assert call["messages"] == HI and call["sampling"].max_tokens == 4
    assert call["trace_carrier"] == headers

    _client(frontend).post("/v1/completions", json={"model": MODEL, "prompt": [5, 6]})
    assert frontend.calls[-1]["prompt"] == [5, 6] and frontend.calls[-1]["trace_carrier"] == {}


def test_objectives_come_from_the_body_or_else_the_headers() -> None:
    frontend = FakeRejectingFrontend()
    headers = {"x-pdserve-ttft-ms": "800", "x-pdserve-tpot-ms": "90", "x-pdserve-priority": "3"}
    _client(frontend).post("/v1/chat/completions", headers=headers,
                           json={"model": MODEL, "messages": HI, "ttft_ms": 250, "priority": 1})
    assert frontend.calls[-1]["objectives"] == Objectives(ttft_ms=250, tpot_ms=90, priority=1)
    _client(frontend).post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert frontend.calls[-1]["objectives"] == Objectives()


@pytest.mark.parametrize(("body", "headers", "param"), [
    ({"ttft_ms": -5}, {}, "ttft_ms"),
    ({"priority": 10}, {}, "priority"),
    ({"tpot_ms": "fast"}, {}, "tpot_ms"),
    ({}, {"x-pdserve-tpot-ms": "fast"}, "x-pdserve-tpot-ms"),
    ({}, {"x-pdserve-priority": "-1"}, "x-pdserve-priority"),
])
def test_bad_objectives_are_400_naming_the_field_or_header(body: dict, headers: dict, param: str) -> None:
    frontend = FakeRejectingFrontend()
    resp = _client(frontend).post("/v1/chat/completions", headers=headers, json={"model": MODEL, "messages": HI, **body})
    assert resp.status_code == 400
    _assert_openai_error(resp.json(), type_="invalid_request_error", param=param)
    assert frontend.calls == []


def test_an_answer_reports_its_measured_latencies_against_its_objectives() -> None:
    client = _client(FakeAnsweringFrontend())
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "Hello"
    assert resp.json()["usage"]["slo"] == {"ttft_ms": 612.5, "tpot_ms": 30.0, "ttft_objective_ms": 500.0,
                                           "tpot_objective_ms": 50.0, "ttft_met": False, "tpot_met": True,
                                           "priority": 0}
    assert (resp.headers["x-pdserve-ttft-ms"], resp.headers["x-pdserve-ttft-met"]) == ("612.5", "false")
    assert (resp.headers["x-pdserve-tpot-ms"], resp.headers["x-pdserve-tpot-met"]) == ("30.0", "true")
    streamed = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["slo"]["ttft_met"] is False


def test_usage_reports_how_the_prompt_kv_travelled() -> None:
    client = _client(FakeAnsweringFrontend())
    expected = {"state": "DONE", "tokens": 3, "bytes": 9216, "transfer_ms": 12.5, "exposed_ms": 4.25, "load_ms": 1.5}
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert resp.json()["usage"]["kv_transfer"] == expected
    streamed = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["kv_transfer"] == expected


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk() -> None:
    client = _client(FakeAnsweringFrontend())
    body = {"model": MODEL, "messages": HI, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json=body).text.splitlines()
              if line.startswith("data: {")]
    text_events = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert [(e["choices"][0]["delta"]["content"], e["usage"]) for e in text_events] == [
        ("Hel", {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
        ("lo", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["slo"]["ttft_met"] is False
    # Without include_usage there is no usage at all, as in vLLM.
    body["stream_options"] = {"continuous_usage_stats": True}
    plain = client.post("/v1/chat/completions", json=body).text
    assert '"usage"' not in plain and "Hel" in plain


def test_text_parts_are_joined_and_developer_is_the_system_role() -> None:
    req = _chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                          {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}])
    assert req.message_dicts() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    for content in ([{"type": "image_url", "image_url": {"url": "http://x"}}], [{"type": "text"}], [{"text": "x"}], 3):
        with pytest.raises(ValidationError) as caught:
            _chat(messages=[{"role": "user", "content": content}])
        err = invalid_request(caught.value.errors())
        assert err.param == "messages[0].content" and "list of" in err.message


def test_chat_logprobs_come_per_token_with_their_top_alternatives_whole_and_streamed() -> None:
    client = _client(FakeAnsweringFrontend())
    body = {"model": MODEL, "messages": HI, "logprobs": True, "top_logprobs": 2}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [(t["token"], t["logprob"], t["bytes"]) for t in content] == [("Hel", -0.5, [72, 101, 108]),
                                                                         ("lo", -9999.0, [108, 111])]
    assert [(a["token"], a["logprob"]) for a in content[0]["top_logprobs"]] == [("Hel", -0.5), ("Hi", -1.25)]
    events = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json={**body, "stream": True})
              .text.splitlines() if line.startswith("data: {")]
    streamed = [t for e in events if e["choices"] and e["choices"][0]["logprobs"]
                for t in e["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_completion_logprobs_in_openais_legacy_shape_with_text_offsets() -> None:
    client = _client(FakeAnsweringFrontend())
    body = {"model": MODEL, "prompt": "hi", "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert whole == {"text_offset": [0, 3], "token_logprobs": [-0.5, -9999.0], "tokens": ["Hel", "lo"],
                     "top_logprobs": [{"Hel": -0.5, "Hi": -1.25}, {"p": -0.01, "lo": -9999.0}]}
    events = [json.loads(line[6:]) for line in client.post("/v1/completions", json={**body, "stream": True})
              .text.splitlines() if line.startswith("data: {")]
    offsets = [o for e in events if e["choices"] and e["choices"][0]["logprobs"]
               for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 3]


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


def test_streamed_request_that_cannot_be_routed_gets_its_status_not_a_stream() -> None:
    resp = _client(FakeNoCapacityFrontend()).post("/v1/chat/completions",
                                               json={"model": MODEL, "messages": HI, "stream": True})
    assert resp.status_code == 429
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["retry-after"] == "3"
    _assert_openai_error(resp.json(), type_="rate_limit_error", param=None)


def test_unexpected_errors_are_500_without_internals() -> None:
    resp = _client(FakeBrokenFrontend()).post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert resp.status_code == 500
    message = _assert_openai_error(resp.json(), type_="server_error", param=None)
    assert "RuntimeError" in message and "s3cret" not in message and "10.0.0.7" not in message


def test_unknown_route_is_404_with_openai_error() -> None:
    resp = _client(FakeRejectingFrontend()).post("/v1/embeddings", json={})
    assert resp.status_code == 404
    assert "/v1/embeddings" in _assert_openai_error(resp.json(), type_="invalid_request_error", param=None)


# --- other routes ----------------------------------------------------------------------------------


def test_models_lists_the_served_model() -> None:
    body = _client(FakeRejectingFrontend()).get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "pdserve"
    assert isinstance(card["created"], int) and card["max_model_len"] == 2048


def test_health_is_503_while_unavailable() -> None:
    resp = _client(FakeRejectingFrontend()).get("/health")
    assert resp.status_code == 503
    assert resp.json() == {"status": "unavailable", "prefill": 0, "decode": 0}


def test_metrics_keep_the_prometheus_content_type() -> None:
    resp = _client(FakeRejectingFrontend()).get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "pdserve_test_requests_total 1.0" in resp.text


def test_openapi_documents_the_request_bodies() -> None:
    doc = _client(FakeRejectingFrontend()).get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model, field in (("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                               ("/v1/completions", "CompletionRequest", "prompt")):
        post = doc["paths"][path]["post"]
        body_schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert body_schema == {"$ref": f"#/components/schemas/{model}"}
        assert field in schemas[model]["required"] and "model" in schemas[model]["required"]
        assert "422" not in post["responses"]  # invalid bodies are 400, as documented
        assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    assert "/v1/models" in doc["paths"] and "/health" in doc["paths"]

