"""An answer's wire shapes, per OpenAI API: the chunks of a streamed choice, a whole choice, and
the answer around its choices. One instance per choice, since a completion choice counts its own
`text_offset`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pdserve.deployments.api.openai_answers import (
    AnswerToolCall,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    FunctionCall,
    FunctionCallDelta,
    ToolCallDelta,
    Usage,
)
from pdserve.deployments.api.tools import ForcedCall, call_id
from pdserve.deployments.tool_parsing import AutoToolCalls, ToolCallReader
from pdserve.prefill.requests import GenerateChunk, TokenLogprob

if TYPE_CHECKING:
    from vllm.entrypoints.generate.base.protocol import DeltaMessage


@dataclass
class ChatShapes:
    """Chat's wire shapes of one answer's choice; id and created are shared by all its chunks."""

    id: str
    created: int
    model: str
    index: int = 0
    forced: ForcedCall | None = None
    """The answer is this tool call (`tools.py`), not text."""
    call_id: str = ""
    """A named call's id, once its first piece is sent."""
    held: str = ""
    """A "required" answer's text so far: sent as calls once whole."""
    auto: AutoToolCalls | None = None
    """tool_choice "auto": the answer is read by the service's tool-call parser."""
    prompt_token_ids: list[int] = field(default_factory=list)
    """The prompt the answer continues (parsers look for a turn left open in it)."""
    reader: ToolCallReader | None = field(init=False, default=None)
    """This choice's own parser (it keeps state across a stream)."""

    def __post_init__(self) -> None:
        self.reader = self.auto.reader(self.prompt_token_ids) if self.auto else None

    def opening(self) -> list[BaseModel]:
        return [self._chunk(ChatChunkChoice(index=self.index, delta=ChatDelta(role="assistant", content="")))]

    def delta(self, chunk: GenerateChunk, usage: Usage | None) -> BaseModel | None:
        """The chunk for the answer's next piece; None when it has nothing to send yet."""
        delta, finish_reason = self._delta(chunk)
        if delta is None and finish_reason is None and chunk.logprobs is None and usage is None:
            return None
        choice = ChatChunkChoice(index=self.index, delta=delta or ChatDelta(), finish_reason=finish_reason,
                                 logprobs=None if chunk.logprobs is None else ChatLogprobs.of(chunk.logprobs))
        return self._chunk(choice, usage)

    def _delta(self, chunk: GenerateChunk) -> tuple[ChatDelta | None, str | None]:
        text, finish_reason = chunk.text, chunk.finish_reason
        if self.reader is not None:
            message = self.reader.delta(text, chunk.token_ids, finished=finish_reason is not None)
            if finish_reason == "stop" and self.reader.called:
                finish_reason = "tool_calls"
            return _chat_delta(message), finish_reason
        if self.forced is None:
            return ChatDelta(content=text or None), finish_reason
        if self.forced.name is not None:  # a named call: the text is its arguments, sent as they come
            if self.call_id:
                piece = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text)) if text else None
                return (ChatDelta(tool_calls=[piece]) if piece else None), finish_reason
            self.call_id = call_id()
            first = ToolCallDelta(index=0, id=self.call_id, type="function",
                                  function=FunctionCallDelta(name=self.forced.name, arguments=text))
            return ChatDelta(tool_calls=[first]), finish_reason
        self.held += text  # "required": a list of calls, read once whole
        if finish_reason is None:
            return None, None
        calls = self.forced.calls(self.held) if finish_reason == "stop" else None
        if calls is None:  # cut short: what there is, as text
            return ChatDelta(content=self.held or None), finish_reason
        return ChatDelta(tool_calls=[ToolCallDelta(index=k, id=call_id(), type="function",
                                                   function=FunctionCallDelta(name=name, arguments=arguments))
                                     for k, (name, arguments) in enumerate(calls)]), "tool_calls"

    def usage(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def choice(self, text: str, token_ids: list[int], finish_reason: str,
               logprobs: list[TokenLogprob] | None) -> ChatChoice:
        """The whole answer's choice. In OpenAI's API a call made by the model's choice ("auto") or
        by "required" finishes with "tool_calls", one forced by name with "stop"."""
        whole = finish_reason == "stop"
        content: str | None = text
        calls: list[tuple[str | None, str, str]] | None = None
        if self.reader is not None:
            content, found = self.reader.whole(text, token_ids)
            calls = [(c.id, c.name, c.arguments) for c in found] or None
        elif self.forced and (whole or self.forced.name):
            named = self.forced.calls(text)
            calls = None if named is None else [(None, name, arguments) for name, arguments in named]
            content = None if calls else text
        if calls:
            finish_reason = "tool_calls" if whole and not (self.forced and self.forced.name) else finish_reason
        message = AssistantMessage(content=content, tool_calls=[
            AnswerToolCall(id=id_ or call_id(), function=FunctionCall(name=name, arguments=arguments))
            for id_, name, arguments in calls or []])
        return ChatChoice(index=self.index, message=message, finish_reason=finish_reason,
                          logprobs=None if logprobs is None else ChatLogprobs.of(logprobs))

    def whole(self, choices: list[Any], usage: Usage) -> BaseModel:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _chunk(self, choice: ChatChunkChoice, usage: Usage | None = None) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)


@dataclass
class CompletionShapes:
    """Completions' wire shapes of one answer's choice."""

    id: str
    created: int
    model: str
    index: int = 0
    echo: str = ""
    """The prompt's text, which starts the choice's text (`echo`)."""
    offset: int = 0
    """Characters of the choice's text its tokens' logprobs have covered (`text_offset`)."""

    def opening(self) -> list[BaseModel]:
        if not self.echo:
            return []
        choice = CompletionChoice(index=self.index, text=self.echo, finish_reason=None)
        return [CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])]

    def delta(self, chunk: GenerateChunk, usage: Usage | None) -> BaseModel:
        choice = CompletionChoice(index=self.index, text=chunk.text, finish_reason=chunk.finish_reason,
                                  logprobs=self._logprobs(chunk.logprobs))
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)

    def usage(self, usage: Usage) -> BaseModel:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def choice(self, text: str, token_ids: list[int], finish_reason: str,
               logprobs: list[TokenLogprob] | None) -> CompletionChoice:
        return CompletionChoice(index=self.index, text=self.echo + text, finish_reason=finish_reason,
                                logprobs=self._logprobs(logprobs))

    def whole(self, choices: list[Any], usage: Usage) -> BaseModel:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _logprobs(self, tokens: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if tokens is None:
            return None
        logprobs = CompletionLogprobs.of(tokens, self.offset)
        self.offset += sum(len(t.token) for t in tokens)
        return logprobs


def _chat_delta(message: DeltaMessage | None) -> ChatDelta | None:
    """vLLM's parsed piece of an answer in pdserve's wire model; None when it holds nothing."""
    if message is None or not (message.content or message.tool_calls):
        return None
    calls = [ToolCallDelta(index=c.index, id=c.id, type="function" if c.id else None,
                           function=FunctionCallDelta(name=c.function.name if c.function else None,
                                                      arguments=c.function.arguments if c.function else None))
             for c in message.tool_calls]
    return ChatDelta(content=message.content or None, tool_calls=calls or None)


Shapes = ChatShapes | CompletionShapes
