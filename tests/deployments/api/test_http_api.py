"""Tests for the OpenAI HTTP API's request models and error answers. No engine runs here: the
frontends below refuse every request (wrong model, prompt too long, no capacity), fail outright, or
answer with fixed chunks; answers with generated text are covered by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.deployments.api.http_api import build_http_app
from pdserve.errors import EngineFailure, InvalidRequest, ModelNotFound, Overloaded
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

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        self.calls.append({"messages": messages, "sampling": sampling, "trace_carrier": trace_carrier, "tools": tools,
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

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
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

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        return GenerateRequest("0" * 32, [1, 2, 3], sampling, SLO(500, 50, 0), trace_carrier or {})

    completion_request = chat_request

    async def detokenize(self, token_ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in token_ids)

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        asked = req.sampling.logprobs is not None
        yield GenerateChunk("Hel", [10], 3, 1, logprobs=[TokenLogprob("Hel", -0.5, [("Hel", -0.5), ("Hi", -1.25)])]
                            if asked else None)
        yield GenerateChunk("lo", [11], 3, 2, "stop", slo=SLOReport(612.5, 30.0, SLO(500.0, 50.0, 0)),
                            kv_transfer=KV_REPORT,
                            logprobs=[TokenLogprob("lo", -9999.0, [("p", -0.01), ("lo", -9999.0)])] if asked else None)


class FakeChoosingFrontend(FakeAnsweringFrontend):
    """Answers each request with its own seed in the text, in two chunks with a turn for the
    others between them; the request for choice `failing` (by id suffix) fails after its first."""

    def __init__(self, failing: int | None = None) -> None:
        super().__init__()
        self.failing = failing
        self.routed: list[GenerateRequest] = []
        self.closed: list[str] = []

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.routed.append(req)
        try:
            yield GenerateChunk(f"seed {req.sampling.seed}", [10], 3, 1)
            await asyncio.sleep(0.01)
            if self.failing is not None and req.request_id.endswith(f"-{self.failing}"):
                raise EngineFailure("the replica serving this choice failed")
            yield GenerateChunk(".", [11], 3, 2, "stop", slo=SLOReport(400.0 + len(self.routed), 30.0,
                                                                        SLO(500.0, 50.0, 0)))
        finally:
            self.closed.append(req.request_id)


class FakeCallingFrontend(FakeAnsweringFrontend):
    """Answers with `pieces` (a forced call's JSON, as structured outputs would hold it), and
    records the tools and messages the chat template got."""

    def __init__(self, pieces: list[str], finish_reason: str = "stop") -> None:
        super().__init__()
        self.pieces, self.finish_reason = pieces, finish_reason

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        self.calls.append({"messages": messages, "sampling": sampling, "tools": tools})
        return GenerateRequest("0" * 32, [1, 2, 3], sampling, SLO(500, 50, 0), trace_carrier or {})

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        for k, piece in enumerate(self.pieces):
            last = k == len(self.pieces) - 1
            yield GenerateChunk(piece, [k], 3, k + 1, self.finish_reason if last else None)


class FakeBrokenFrontend(FakeRejectingFrontend):
    def check_model(self, model: str) -> None:
        raise RuntimeError("connection to 10.0.0.7 refused, token=s3cret")


def _client(frontend: FakeRejectingFrontend) -> TestClient:
    return TestClient(build_http_app(lambda: frontend), raise_server_exceptions=False)


def _assert_openai_error(body: dict, *, type_: str, param: str | None) -> str:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["param"] == param
    return body["error"]["message"]


# --- HTTP errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": MODEL}, "messages", "Field required"),
    ({"model": MODEL, "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "'system'"),
    ({"model": MODEL, "messages": HI, "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"model": MODEL, "messages": HI, "n": 17}, "n", "less than or equal to 16"),
    ({"model": MODEL, "messages": HI, "n": 0}, "n", "greater than or equal to 1"),
    ({"model": MODEL, "messages": HI, "n": 2, "seed": 2**63 - 1}, "n", "last choice's seed"),
    ({"model": MODEL, "messages": HI, "tool_choice": "auto"}, "tool_choice", "needs tools"),
    ({"model": MODEL, "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice",
     "tool-call parser"),
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
    resp = _client(FakeRejectingFrontend()).post("/v1/completions", json={"model": MODEL, "prompt": "hi", "suffix": "!"})
    assert resp.status_code == 400
    assert "not supported by pdserve" in _assert_openai_error(resp.json(), type_="invalid_request_error",
                                                              param="suffix")


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


def _events(resp) -> list[dict]:
    return [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]


def test_echo_starts_a_completion_with_its_prompts_text_whole_and_streamed() -> None:
    client = _client(FakeAnsweringFrontend())
    for prompt, echoed in (("Say: ", "Say: "), ([5, 7], "<5><7>")):
        body = {"model": MODEL, "prompt": prompt, "echo": True}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == echoed + "Hello"
        events = _events(client.post("/v1/completions", json={**body, "stream": True}))
        assert [e["choices"][0]["text"] for e in events] == [echoed, "Hel", "lo"]
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).json()["choices"][0]["text"] == "Hello"
    refused = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"


def test_n_choices_are_requests_of_their_own_seeded_as_vllm_seeds_them() -> None:
    frontend = FakeChoosingFrontend()
    body = {"model": MODEL, "messages": HI, "n": 3, "seed": 5}
    whole = _client(frontend).post("/v1/chat/completions", json=body).json()
    assert [(c["index"], c["message"]["content"]) for c in whole["choices"]] == [
        (0, "seed 5."), (1, "seed 6."), (2, "seed 7.")]
    assert (whole["usage"]["prompt_tokens"], whole["usage"]["completion_tokens"]) == (3, 6)  # the prompt once
    assert len({r.request_id for r in frontend.routed}) == 3 and sorted(frontend.closed) == sorted(
        r.request_id for r in frontend.routed)
    completion = _client(FakeChoosingFrontend()).post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                                               "n": 2}).json()
    assert [(c["index"], c["text"]) for c in completion["choices"]] == [(0, "seed None."), (1, "seed None.")]


def test_n_choices_stream_interleaved_each_under_its_index() -> None:
    body = {"model": MODEL, "messages": HI, "n": 2, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    events = _events(_client(FakeChoosingFrontend()).post("/v1/chat/completions", json=body))
    deltas = [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events if e["choices"]]
    assert [i for i, d in deltas if d.get("role") == "assistant"] == [0, 1]
    assert {i: "".join(d.get("content") or "" for j, d in deltas if j == i) for i in (0, 1)} == {0: "seed 5.",
                                                                                                1: "seed 6."}
    assert [i for i, d in deltas if d.get("content")] in ([0, 1, 0, 1], [0, 1, 1, 0])  # as they come
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    # The request's SLO report is its slowest choice's.
    assert events[-1]["usage"]["slo"]["ttft_ms"] == 402.0


def test_one_failed_choice_fails_the_request_and_ends_the_others() -> None:
    frontend = FakeChoosingFrontend(failing=1)
    body = {"model": MODEL, "messages": HI, "n": 3}
    resp = _client(frontend).post("/v1/chat/completions", json=body)
    assert resp.status_code == 500 and "failed" in resp.json()["error"]["message"]
    assert sorted(frontend.closed) == sorted(r.request_id for r in frontend.routed)
    frontend = FakeChoosingFrontend(failing=2)
    events = _events(_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    assert "failed" in events[-1]["error"]["message"]
    assert sorted(frontend.closed) == sorted(r.request_id for r in frontend.routed)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_a_named_tool_choice_answers_with_that_call_whole_and_streamed() -> None:
    frontend = FakeCallingFrontend(['{"city": ', '"Paris"}'])
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = _client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and call["id"]
    assert frontend.calls[0]["tools"] == [WEATHER, TIME]  # to the chat template
    assert frontend.calls[0]["sampling"].structured.json_schema == WEATHER["function"]["parameters"]
    events = _events(_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"] and calls[1].keys() == {"index",
                                                                                                   "function"}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_tool_choice_answers_with_the_calls_the_json_lists() -> None:
    answer = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    frontend = FakeCallingFrontend([answer[:20], answer[20:]])
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER, TIME], "tool_choice": "required"}
    choice = _client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "get_time", "arguments": "{}"}]
    assert choice["finish_reason"] == "tool_calls"
    schema = frontend.calls[0]["sampling"].structured.json_schema
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2  # vLLM's schema for the tools
    events = _events(_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    sent = [e["choices"][0] for e in events]
    assert [c["function"]["name"] for c in sent[-1]["delta"]["tool_calls"]] == ["get_weather", "get_time"]
    assert sent[-1]["finish_reason"] == "tool_calls" and len(sent) == 2  # the opening, then the calls once whole


def test_a_forced_call_cut_short_by_max_tokens_is_partial_arguments_or_text() -> None:
    frontend = FakeCallingFrontend(['{"city": "Pa'], finish_reason="length")
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 1}
    choice = _client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": '{"city": "Pa', "tool_calls": []},
                      "finish_reason": "length", "logprobs": None}
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = _client(frontend).post("/v1/chat/completions", json=named).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Pa'}
    assert choice["finish_reason"] == "length"  # as the stream says it


def test_tool_results_and_earlier_calls_reach_the_chat_template() -> None:
    frontend = FakeCallingFrontend(["It is sunny."])
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    body = {"model": MODEL, "messages": messages, "tools": [WEATHER], "tool_choice": "none"}
    answer = _client(frontend).post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == "It is sunny."
    assert frontend.calls[0]["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    assert frontend.calls[0]["sampling"].structured is None


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
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant", "tool"]
    assert "/v1/models" in doc["paths"] and "/health" in doc["paths"]

