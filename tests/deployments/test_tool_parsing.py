"""The service's tool-call parser: checked against the model when the ingress starts, and one
reader per answer (request-level reading through the HTTP API: api/test_tools.py)."""

from __future__ import annotations

from typing import Any

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

from pdserve.deployments.tool_parsing import ToolCallReader, ToolParsing
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import Sampling

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "tools": [WEATHER], "tool_choice": "auto", **fields})


def test_an_unknown_parser_fails_the_ingress_naming_vllms_parsers() -> None:
    with pytest.raises(ValueError, match=r"'nonesuch' is not one of vLLM's tool-call parsers: .*hermes"):
        ToolParsing("nonesuch", str(resolve_model(None)))


def test_a_parser_needing_tokens_the_model_lacks_fails_the_ingress() -> None:
    with pytest.raises(ValueError, match=r"'llama3_json' does not fit this model: .*python_tag"):
        ToolParsing("llama3_json", str(resolve_model(None)))


def _streamed_calls(reader: ToolCallReader, tokenizer: Any, text: str) -> list[tuple[int, str]]:
    """(index, name) of each call `reader` reads in `text` streamed one token a chunk."""
    ids = tokenizer.encode(text)
    named = []
    for k, token in enumerate(ids):
        message = reader.delta(tokenizer.decode([token]), [token], finished=k == len(ids) - 1)
        named += [(c.index, c.function.name) for c in message.tool_calls if c.function and c.function.name] \
            if message else []
    return named


def test_each_answer_is_read_by_its_own_parser_so_one_streams_state_does_not_leak_into_the_next() -> None:
    parsing = ToolParsing("xlam", str(resolve_model(None)))
    auto = parsing.for_request(_request())
    first, second = auto.reader([1]), auto.reader([1])
    assert _streamed_calls(first, parsing.tokenizer, CALL) == [(0, "get_weather")] and first.called
    assert _streamed_calls(second, parsing.tokenizer, CALL) == [(0, "get_weather")] and second.called
    content, calls = auto.reader([1]).whole(CALL, parsing.tokenizer.encode(CALL))
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]


def test_a_parser_marking_calls_with_special_tokens_keeps_them_in_the_engines_text() -> None:
    hermes = ToolParsing("hermes", str(resolve_model(None))).for_request(_request())
    xlam = ToolParsing("xlam", str(resolve_model(None))).for_request(_request())
    assert hermes.sampling(Sampling()).skip_special_tokens is False
    assert xlam.sampling(Sampling()).skip_special_tokens is True
