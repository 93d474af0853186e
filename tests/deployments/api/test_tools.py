"""Function calling through the HTTP API: forced calls answered as tool calls, whole and
streamed; calls the model chose ("auto") read by vLLM's parser for the model family; tool results
reaching the chat template (request validation: test_openai_models.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from pdserve.deployments.tool_parsing import ToolParsing
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import SLO, GenerateChunk, GenerateRequest, Objectives, Sampling
from tests.deployments.api.fake_http_frontends import HI, MODEL, FakeAnsweringFrontend, http_client, sse_events


class FakeCallingFrontend(FakeAnsweringFrontend):
    """Answers with `pieces` (a forced call's JSON, as structured outputs would hold it), and
    records the tools and messages the chat template got."""

    def __init__(self, pieces: list[str], finish_reason: str = "stop", token_ids: list[int] | None = None) -> None:
        super().__init__()
        self.pieces, self.finish_reason = pieces, finish_reason
        self.token_ids = token_ids or list(range(len(pieces)))
        """Each piece's token (pieces made from real tokens carry their ids)."""

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        self.calls.append({"messages": messages, "sampling": sampling, "tools": tools})
        return GenerateRequest("0" * 32, [1, 2, 3], sampling, SLO(500, 50, 0), trace_carrier or {})

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        for k, piece in enumerate(self.pieces):
            last = k == len(self.pieces) - 1
            yield GenerateChunk(piece, [self.token_ids[k]], 3, k + 1, self.finish_reason if last else None)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_a_named_tool_choice_answers_with_that_call_whole_and_streamed() -> None:
    frontend = FakeCallingFrontend(['{"city": ', '"Paris"}'])
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None  # OpenAI's, for a named call
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and call["id"]
    assert frontend.calls[0]["tools"] == [WEATHER, TIME]  # to the chat template
    assert frontend.calls[0]["sampling"].structured.json_schema == WEATHER["function"]["parameters"]
    events = sse_events(http_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"] and calls[1].keys() == {"index",
                                                                                                   "function"}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_required_tool_choice_answers_with_the_calls_the_json_lists() -> None:
    answer = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    frontend = FakeCallingFrontend([answer[:20], answer[20:]])
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER, TIME], "tool_choice": "required"}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "get_time", "arguments": "{}"}]
    assert choice["finish_reason"] == "tool_calls"
    schema = frontend.calls[0]["sampling"].structured.json_schema
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2  # vLLM's schema for the tools
    events = sse_events(http_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    sent = [e["choices"][0] for e in events]
    assert [c["function"]["name"] for c in sent[-1]["delta"]["tool_calls"]] == ["get_weather", "get_time"]
    assert sent[-1]["finish_reason"] == "tool_calls" and len(sent) == 2  # the opening, then the calls once whole


def test_a_forced_call_cut_short_by_max_tokens_is_partial_arguments_or_text() -> None:
    frontend = FakeCallingFrontend(['{"city": "Pa'], finish_reason="length")
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 1}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": '{"city": "Pa', "tool_calls": []},
                      "finish_reason": "length", "logprobs": None}
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = http_client(frontend).post("/v1/chat/completions", json=named).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Pa'}
    assert choice["finish_reason"] == "length"  # as the stream says it


def test_tool_results_and_earlier_calls_reach_the_chat_template() -> None:
    frontend = FakeCallingFrontend(["It is sunny."])
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    body = {"model": MODEL, "messages": messages, "tools": [WEATHER], "tool_choice": "none"}
    answer = http_client(frontend).post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == "It is sunny."
    assert frontend.calls[0]["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    assert frontend.calls[0]["sampling"].structured is None


@pytest.fixture(scope="module")
def xlam() -> ToolParsing:
    """vLLM's parser for the default model's family (SmolLM2), over that model's tokenizer."""
    return ToolParsing("xlam", str(resolve_model(None)))


XLAM_CALLS = ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
              '{"name": "get_time", "arguments": {}}]</tool_call>')


def test_auto_tool_choice_is_refused_by_a_service_without_a_tool_parser() -> None:
    frontend = FakeCallingFrontend(["never sent"])
    for body in ({"model": MODEL, "messages": HI, "tools": [WEATHER]},  # OpenAI's default with tools: "auto"
                 {"model": MODEL, "messages": HI, "tools": [WEATHER], "tool_choice": "auto"}):
        answer = http_client(frontend).post("/v1/chat/completions", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "tool_choice"
        assert "tool_call_parser" in answer.json()["error"]["message"]
    assert frontend.calls == []


def token_by_token(parsing: ToolParsing, text: str) -> FakeCallingFrontend:
    """A frontend answering `text` one token a chunk, as an engine streams it."""
    ids = parsing.tokenizer.encode(text)
    frontend = FakeCallingFrontend([parsing.tokenizer.decode([i]) for i in ids], token_ids=ids)
    frontend.tool_parsing = parsing
    return frontend


def test_calls_the_model_chose_are_read_by_its_familys_parser_whole_and_streamed(xlam: ToolParsing) -> None:
    frontend = token_by_token(xlam, XLAM_CALLS)
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER, TIME]}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "get_time", "arguments": "{}"}]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert frontend.calls[0]["sampling"].structured is None  # the model decides: nothing holds its answer
    events = sse_events(http_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    pieces = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    streamed: dict[int, dict[str, str]] = {}
    for piece in pieces:
        call = streamed.setdefault(piece["index"], {"name": "", "arguments": ""})
        call["name"] += piece["function"].get("name") or ""
        call["arguments"] += piece["function"].get("arguments") or ""
    assert list(streamed.values()) == [c["function"] for c in choice["message"]["tool_calls"]]
    assert all(p["id"] for p in pieces if "name" in p["function"])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_an_answer_without_calls_stays_text_under_auto(xlam: ToolParsing) -> None:
    frontend = FakeCallingFrontend(["It is ", "sunny."])
    frontend.tool_parsing = xlam
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER], "tool_choice": "auto"}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny.", "tool_calls": []}
    assert choice["finish_reason"] == "stop"
    events = sse_events(http_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "It is sunny."
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call_the_model_made(xlam: ToolParsing) -> None:
    frontend = token_by_token(xlam, XLAM_CALLS)
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER, TIME], "parallel_tool_calls": False}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    events = sse_events(http_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    assert {c["index"] for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])} == {0}


def test_a_parser_that_reads_special_tokens_has_the_engines_keep_them() -> None:
    hermes = ToolParsing("hermes", str(resolve_model(None)))
    frontend = FakeCallingFrontend(['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'])
    frontend.tool_parsing = hermes
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER]}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert frontend.calls[0]["sampling"].skip_special_tokens is False
