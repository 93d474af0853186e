"""`tool_choice: "auto"`: the model decides whether to call a tool, in its own syntax, and vLLM's
tool-call parser for the model family (the service's `tool_call_parser`) reads the answer as text
and calls, whole or delta by delta, as vLLM's OpenAI server does.

A parser keeps state across a streamed answer, so each choice of each request reads with its own
(`ToolCallReader`), built from vLLM's own request model, which its parsers take.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.errors import InvalidRequest
from pdserve.prefill.requests import Sampling

if TYPE_CHECKING:
    from vllm.entrypoints.generate.base.protocol import DeltaMessage, FunctionCall
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.abstract_parser import Parser

log = logging.getLogger("pdserve.ingress")


class ToolParsing:
    """The service's tool-call parser (vLLM's `--tool-call-parser`), checked against the model's
    tokenizer once, at start: a parser that needs tokens the tokenizer lacks fails the ingress,
    not every request."""

    def __init__(self, name: str, model_path: str):
        from transformers import AutoTokenizer
        from vllm.parser import ParserManager
        from vllm.tool_parsers import ToolParserManager

        self.name = name
        known = ToolParserManager.list_registered()
        if name not in known:
            raise ValueError(f"tool_call_parser {name!r} is not one of vLLM's tool-call parsers: {', '.join(known)}")
        # Its own tokenizer: parsers call it on the event loop, while the request builder's runs on
        # its thread, and a tokenizer is not safe to call from two threads at once.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        try:
            parser_cls = ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True,
                                                  tokenizer=self.tokenizer, model_name=model_path)
        except TypeError as exc:  # the tokenizer lacks the tokens the parser looks for
            raise ValueError(f"tool_call_parser {name!r} does not fit this model: {exc}") from None
        assert parser_cls is not None
        self.parser_cls: type[Parser] = parser_cls
        log.info("ingress: tool_choice 'auto' answers read by vLLM's %r tool-call parser", name)

    def for_request(self, request: ChatCompletionRequest) -> AutoToolCalls:
        """How one request is served and read: vLLM's parser adjusts the request first (some keep
        special tokens in the text, where their calls are marked)."""
        adjusted = self.parser_cls(self.tokenizer, request.tools).adjust_request(request.model_copy(deep=True))
        if adjusted.structured_outputs is not None:  # a structural tag holding the calls to the tools
            raise InvalidRequest(f"the {self.name!r} tool-call parser holds 'auto' answers to a structural tag, "
                                 "which pdserve's engines do not take; send tool_choice 'required' or a named "
                                 "function", param="tool_choice")
        return AutoToolCalls(self, adjusted)


@dataclass(frozen=True)
class AutoToolCalls:
    """One request's tool_choice "auto": its sampling and a reader per choice."""

    parsing: ToolParsing
    request: ChatCompletionRequest
    """vLLM's model of the request, as the parser adjusted it."""

    def sampling(self, sampling: Sampling) -> Sampling:
        """`sampling` with what the parser needs of the engines' detokenizing."""
        if self.request.skip_special_tokens == sampling.skip_special_tokens:
            return sampling
        return sampling.model_copy(update={"skip_special_tokens": self.request.skip_special_tokens})

    def reader(self, prompt_token_ids: list[int]) -> ToolCallReader:
        """A reader for one choice of the answer to `prompt_token_ids`."""
        parser = self.parsing.parser_cls(self.parsing.tokenizer, self.request.tools)
        return ToolCallReader(parser, self.request, prompt_token_ids)


class ToolCallReader:
    """One choice's answer read as content and tool calls by vLLM's parser."""

    def __init__(self, parser: Parser, request: ChatCompletionRequest, prompt_token_ids: list[int]):
        self.parser = parser
        self.request = request
        self.prompt_token_ids = prompt_token_ids
        """vLLM's parsers start reading calls once they know whether the prompt left a reasoning
        section open."""
        self.called = False
        """Whether the answer made a call: its finish reason is then "tool_calls"."""

    def whole(self, text: str, token_ids: list[int]) -> tuple[str | None, list[FunctionCall]]:
        """The whole answer's content (None when it is only calls) and calls."""
        _, content, calls = self.parser.parse(text, self.request, enable_auto_tools=True,
                                              model_output_token_ids=token_ids)
        calls = self._kept(list(calls or []))
        self.called = bool(calls)
        return (content or None) if calls else content, calls

    def delta(self, text: str, token_ids: list[int], finished: bool) -> DeltaMessage | None:
        """What this piece of the answer adds (None: nothing yet, the parser holds it)."""
        message = self.parser.parse_delta(text, token_ids, self.request, self.prompt_token_ids, finished=finished)
        if message is not None and message.tool_calls:
            message.tool_calls = self._kept(message.tool_calls)
            self.called = self.called or bool(message.tool_calls)
        return message

    def _kept(self, calls: list[Any]) -> list[Any]:
        """`parallel_tool_calls: false` keeps the first call only, as vLLM does."""
        if self.request.parallel_tool_calls is not False:
            return calls
        return [c for i, c in enumerate(calls) if getattr(c, "index", i) == 0]
