"""Function calling through the HTTP API: forced calls answered as tool calls, whole and
streamed, and tool results reaching the chat template (request validation:
test_openai_models.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pdserve.prefill.requests import SLO, GenerateChunk, GenerateRequest, Objectives, Sampling
from tests.deployments.api.fake_http_frontends import HI, MODEL, FakeAnsweringFrontend, http_client, sse_events


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


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_a_named_tool_choice_answers_with_that_call_whole_and_streamed() -> None:
    frontend = FakeCallingFrontend(['{"city": ', '"Paris"}'])
    body = {"model": MODEL, "messages": HI, "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = http_client(frontend).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and call["id"]
    assert frontend.calls[0]["tools"] == [WEATHER, TIME]  # to the chat template
    assert frontend.calls[0]["sampling"].structured.json_schema == WEATHER["function"]["parameters"]
    events = sse_events(http_client(frontend).post("/v1/chat/completions", json={**body, "stream": True}))
    calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"] and calls[1].keys() == {"index",
                                                                                                   "function"}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


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
