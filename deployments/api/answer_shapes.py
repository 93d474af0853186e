"""An answer's wire shapes, per OpenAI API: the chunks of a streamed choice, a whole choice, and
the answer around its choices. One instance per choice, since a completion choice counts its own
`text_offset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from pdserve.prefill.requests import TokenLogprob


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

    def opening(self) -> list[BaseModel]:
        return [self._chunk(ChatChunkChoice(index=self.index, delta=ChatDelta(role="assistant", content="")))]

    def delta(self, text: str, finish_reason: str | None, usage: Usage | None,
              logprobs: list[TokenLogprob] | None) -> BaseModel | None:
        """The chunk for the answer's next piece; None when it has nothing to send yet."""
        delta, finish_reason = self._delta(text, finish_reason)
        if delta is None and finish_reason is None and logprobs is None and usage is None:
            return None
        choice = ChatChunkChoice(index=self.index, delta=delta or ChatDelta(), finish_reason=finish_reason,
                                 logprobs=None if logprobs is None else ChatLogprobs.of(logprobs))
        return self._chunk(choice, usage)

    def _delta(self, text: str, finish_reason: str | None) -> tuple[ChatDelta | None, str | None]:
        if self.forced is None:
            return ChatDelta(content=text or None), finish_reason
        if self.forced.name is not None:  # a named call: the text is its arguments, sent as they come
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
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

    def choice(self, text: str, finish_reason: str, logprobs: list[TokenLogprob] | None) -> ChatChoice:
        whole = finish_reason == "stop"
        calls = self.forced.calls(text) if self.forced and (whole or self.forced.name) else None
        if calls is None:
            message = AssistantMessage(content=text)
        else:
            message = AssistantMessage(content=None, tool_calls=[
                AnswerToolCall(id=call_id(), function=FunctionCall(name=name, arguments=arguments))
                for name, arguments in calls])
            finish_reason = "tool_calls" if whole else finish_reason
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

    def delta(self, text: str, finish_reason: str | None, usage: Usage | None,
              logprobs: list[TokenLogprob] | None) -> BaseModel:
        choice = CompletionChoice(index=self.index, text=text, finish_reason=finish_reason,
                                  logprobs=self._logprobs(logprobs))
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)

    def usage(self, usage: Usage) -> BaseModel:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def choice(self, text: str, finish_reason: str, logprobs: list[TokenLogprob] | None) -> CompletionChoice:
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


Shapes = ChatShapes | CompletionShapes
