"""An answer's wire shapes, per OpenAI API: the chunks of a streamed choice, a whole choice, and
the answer around its choices. One instance per choice, since a completion choice counts its own
`text_offset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from pdserve.deployments.api.openai_answers import (
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
    Usage,
)
from pdserve.prefill.requests import TokenLogprob


@dataclass
class ChatShapes:
    """Chat's wire shapes of one answer's choice; id and created are shared by all its chunks."""

    id: str
    created: int
    model: str
    index: int = 0

    def opening(self) -> list[BaseModel]:
        return [self._chunk(ChatChunkChoice(index=self.index, delta=ChatDelta(role="assistant", content="")))]

    def delta(self, text: str, finish_reason: str | None, usage: Usage | None,
              logprobs: list[TokenLogprob] | None) -> BaseModel:
        choice = ChatChunkChoice(index=self.index, delta=ChatDelta(content=text or None), finish_reason=finish_reason,
                                 logprobs=None if logprobs is None else ChatLogprobs.of(logprobs))
        return self._chunk(choice, usage)

    def usage(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def choice(self, text: str, finish_reason: str, logprobs: list[TokenLogprob] | None) -> ChatChoice:
        return ChatChoice(index=self.index, message=AssistantMessage(content=text), finish_reason=finish_reason,
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
