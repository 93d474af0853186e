"""The OpenAI HTTP API's request handling and error answers, over the fake frontends of
`fake_http_frontends.py` (answers' choices: test_choices.py; tool calls: test_tools.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.prefill.requests import SLO, GenerateChunk, GenerateRequest, Objectives, SLOReport
from tests.deployments.api.fake_http_frontends import (
    HI,
    MODEL,
    FakeAnsweringFrontend,
    FakeBrokenFrontend,
    FakeNoCapacityFrontend,
    FakeRejectingFrontend,
    assert_openai_error,
    http_client,
    sse_events,
)

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
    resp = http_client(FakeRejectingFrontend()).post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    message = assert_openai_error(resp.json(), type_="invalid_request_error", param=param)
    assert words in message


def test_invalid_completion_body_is_400() -> None:
    resp = http_client(FakeRejectingFrontend()).post("/v1/completions", json={"model": MODEL, "prompt": "hi", "suffix": "!"})
    assert resp.status_code == 400
    assert "not supported by pdserve" in assert_openai_error(resp.json(), type_="invalid_request_error",
                                                              param="suffix")


@pytest.mark.parametrize(("content", "content_type", "words"), [
    (b'{"model": "x", ', "application/json", "not valid JSON"),
    (b'{"model": "x"}', "text/plain", "Content-Type: application/json"),
    (b"", "application/json", "Field required"),
])
def test_unreadable_bodies_are_400(content: bytes, content_type: str, words: str) -> None:
    resp = http_client(FakeRejectingFrontend()).post("/v1/chat/completions", content=content,
                                              headers={"content-type": content_type})
    assert resp.status_code == 400
    assert words in assert_openai_error(resp.json(), type_="invalid_request_error", param=None)


def test_unknown_model_is_404() -> None:
    resp = http_client(FakeRejectingFrontend()).post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert resp.status_code == 404
    message = assert_openai_error(resp.json(), type_="invalid_request_error", param="model")
    assert resp.json()["error"]["code"] == "model_not_found" and MODEL in message


def test_frontend_rejection_keeps_its_status_and_sees_trace_context() -> None:
    frontend = FakeRejectingFrontend()
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k=v"}
    resp = http_client(frontend).post("/v1/chat/completions", headers=headers,
                                  json={"model": MODEL, "messages": HI, "max_completion_tokens": 4, "stream": True})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    [call] = frontend.calls
    assert call["messages"] == HI and call["sampling"].max_tokens == 4
    assert call["trace_carrier"] == headers

    http_client(frontend).post("/v1/completions", json={"model": MODEL, "prompt": [5, 6]})
    assert frontend.calls[-1]["prompt"] == [5, 6] and frontend.calls[-1]["trace_carrier"] == {}


def test_objectives_come_from_the_body_or_else_the_headers() -> None:
    frontend = FakeRejectingFrontend()
    headers = {"x-pdserve-ttft-ms": "800", "x-pdserve-tpot-ms": "90", "x-pdserve-priority": "3"}
    http_client(frontend).post("/v1/chat/completions", headers=headers,
                           json={"model": MODEL, "messages": HI, "ttft_ms": 250, "priority": 1})
    assert frontend.calls[-1]["objectives"] == Objectives(ttft_ms=250, tpot_ms=90, priority=1)
    http_client(frontend).post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
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
    resp = http_client(frontend).post("/v1/chat/completions", headers=headers, json={"model": MODEL, "messages": HI, **body})
    assert resp.status_code == 400
    assert_openai_error(resp.json(), type_="invalid_request_error", param=param)
    assert frontend.calls == []


def test_an_answer_reports_its_measured_latencies_against_its_objectives() -> None:
    client = http_client(FakeAnsweringFrontend())
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
    client = http_client(FakeAnsweringFrontend())
    expected = {"state": "DONE", "tokens": 3, "bytes": 9216, "transfer_ms": 12.5, "exposed_ms": 4.25, "load_ms": 1.5}
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert resp.json()["usage"]["kv_transfer"] == expected
    streamed = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"]["kv_transfer"] == expected


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk() -> None:
    client = http_client(FakeAnsweringFrontend())
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
    client = http_client(FakeAnsweringFrontend())
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
    client = http_client(FakeAnsweringFrontend())
    body = {"model": MODEL, "prompt": "hi", "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert whole == {"text_offset": [0, 3], "token_logprobs": [-0.5, -9999.0], "tokens": ["Hel", "lo"],
                     "top_logprobs": [{"Hel": -0.5, "Hi": -1.25}, {"p": -0.01, "lo": -9999.0}]}
    events = [json.loads(line[6:]) for line in client.post("/v1/completions", json={**body, "stream": True})
              .text.splitlines() if line.startswith("data: {")]
    offsets = [o for e in events if e["choices"] and e["choices"][0]["logprobs"]
               for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 3]


def test_echo_starts_a_completion_with_its_prompts_text_whole_and_streamed() -> None:
    client = http_client(FakeAnsweringFrontend())
    for prompt, echoed in (("Say: ", "Say: "), ([5, 7], "<5><7>")):
        body = {"model": MODEL, "prompt": prompt, "echo": True}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == echoed + "Hello"
        events = sse_events(client.post("/v1/completions", json={**body, "stream": True}))
        assert [e["choices"][0]["text"] for e in events] == [echoed, "Hel", "lo"]
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).json()["choices"][0]["text"] == "Hello"
    refused = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"


def test_streamed_request_that_cannot_be_routed_gets_its_status_not_a_stream() -> None:
    resp = http_client(FakeNoCapacityFrontend()).post("/v1/chat/completions",
                                               json={"model": MODEL, "messages": HI, "stream": True})
    assert resp.status_code == 429
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["retry-after"] == "3"
    assert_openai_error(resp.json(), type_="rate_limit_error", param=None)


def test_unexpected_errors_are_500_without_internals() -> None:
    resp = http_client(FakeBrokenFrontend()).post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert resp.status_code == 500
    message = assert_openai_error(resp.json(), type_="server_error", param=None)
    assert "RuntimeError" in message and "s3cret" not in message and "10.0.0.7" not in message


def test_unknown_route_is_404_with_openai_error() -> None:
    resp = http_client(FakeRejectingFrontend()).post("/v1/embeddings", json={})
    assert resp.status_code == 404
    assert "/v1/embeddings" in assert_openai_error(resp.json(), type_="invalid_request_error", param=None)


# --- other routes ----------------------------------------------------------------------------------


def test_models_lists_the_served_model() -> None:
    body = http_client(FakeRejectingFrontend()).get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "pdserve"
    assert isinstance(card["created"], int) and card["max_model_len"] == 2048


def test_health_is_503_while_unavailable() -> None:
    resp = http_client(FakeRejectingFrontend()).get("/health")
    assert resp.status_code == 503
    assert resp.json() == {"status": "unavailable", "prefill": 0, "decode": 0}


def test_metrics_keep_the_prometheus_content_type() -> None:
    resp = http_client(FakeRejectingFrontend()).get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "pdserve_test_requests_total 1.0" in resp.text


def test_openapi_documents_the_request_bodies() -> None:
    doc = http_client(FakeRejectingFrontend()).get("/openapi.json").json()
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



class FakeSessionFrontend(FakeAnsweringFrontend):
    """Records the session of each request it streams; its answer says 2 prompt tokens were cached."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[str] = []

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.sessions.append(req.session_id)
        yield GenerateChunk("Hi", [10], 3, 1, "stop", slo=SLOReport(612.5, None, SLO(500.0, 50.0, 0)), cached_tokens=2)


def test_a_request_names_its_session_by_header_or_user_and_an_oversized_name_is_refused() -> None:
    frontend = FakeSessionFrontend()
    client = http_client(frontend)
    chat = {"model": MODEL, "messages": HI}
    answer = client.post("/v1/chat/completions", json={**chat, "user": "alice"}).json()
    client.post("/v1/chat/completions", json={**chat, "user": "alice"}, headers={"x-pdserve-session-id": "trip-42"})
    client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert frontend.sessions == ["alice", "trip-42", ""]
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}  # OpenAI's field, from the engine
    for body, headers, field in (({**chat, "user": "u" * 257}, {}, "user"),
                                 (chat, {"x-pdserve-session-id": "s" * 257}, "x-pdserve-session-id")):
        refused = client.post("/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field
    assert len(frontend.sessions) == 3
