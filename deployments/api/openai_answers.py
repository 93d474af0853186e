"""OpenAI's answer bodies as pdserve sends them: whole answers, stream chunks, usage (with
pdserve's SLO and KV-transfer reports), logprobs, model cards and errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.prefill.requests import TokenLogprob


class ApiModel(BaseModel):
    """Field docstrings become the field descriptions of the OpenAPI document."""

    model_config = ConfigDict(use_attribute_docstrings=True)


def _absent_if_none() -> Any:
    """A field left out of the JSON while None, as OpenAI leaves out a chunk's unset fields."""
    return Field(None, exclude_if=lambda value: value is None)


class SLOUsage(ApiModel):
    """How the request did against its objectives, measured at the ingress."""

    ttft_ms: float
    tpot_ms: float | None
    """null when the answer had a single token."""
    ttft_objective_ms: float
    tpot_objective_ms: float
    ttft_met: bool
    tpot_met: bool
    priority: int


class KVTransferUsage(ApiModel):
    """How a disaggregated request's prompt KV moved from the prefill to the decode replica."""

    state: str
    """"DONE" or "FAILED"."""
    tokens: int
    bytes: int
    transfer_ms: float
    """Prefill forward start to the KV in the decode replica's cache (the push overlaps the forward)."""
    exposed_ms: float
    """End of the prefill forward to the KV in the decode cache: what the transfer adds to TTFT."""
    load_ms: float
    """Copying the received KV into the paged cache."""

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> "KVTransferUsage":
        start, ready = int(report.get("start_unix_ns") or 0), int(report.get("ready_unix_ns") or 0)
        return cls(state=str(report.get("state", "")), tokens=int(report.get("tokens", 0)),
                   bytes=int(report.get("bytes", 0)),
                   transfer_ms=round((ready - start) / 1e6, 3) if start and ready else 0.0,
                   exposed_ms=round(float(report.get("exposed_ms", 0.0)), 3),
                   load_ms=round(float(report.get("load_ms", 0.0)), 3))


class PromptTokensDetails(ApiModel):
    cached_tokens: int
    """Prompt tokens the engine that prefilled it took from its prefix cache instead of computing."""


class Usage(ApiModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = _absent_if_none()
    """OpenAI's: how much of the prompt was cached (absent when the engine did not say)."""
    slo: SLOUsage | None = _absent_if_none()
    """pdserve's addition: measured TTFT and TPOT against the request's objectives."""
    kv_transfer: KVTransferUsage | None = _absent_if_none()
    """pdserve's addition, disaggregated requests whose prompt KV came from a prefill replica."""


class _Answer(ApiModel):
    """What every answer object carries; a stream's chunks share the id and `created`."""

    id: str
    """`chatcmpl-<hex>` or `cmpl-<hex>`."""
    created: int
    """Unix seconds."""
    model: str


class TopLogprob(ApiModel):
    token: str
    logprob: float
    """-9999.0 for a token the sampling rules out (JSON has no -inf), as vLLM reports it."""
    bytes: list[int] | None
    """The token's UTF-8 bytes."""


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    """The likeliest tokens at this position, likeliest first (`top_logprobs` of them)."""


class ChatLogprobs(ApiModel):
    content: list[ChatTokenLogprob] | None

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob]) -> ChatLogprobs:
        def top(token: str, logprob: float) -> TopLogprob:
            return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8", errors="replace")))

        return cls(content=[ChatTokenLogprob(**top(t.token, t.logprob).model_dump(),
                                             top_logprobs=[top(tok, lp) for tok, lp in t.top]) for t in tokens])


class CompletionLogprobs(ApiModel):
    text_offset: list[int]
    """Where each token starts in the answer's text."""
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob], start_offset: int) -> CompletionLogprobs:
        offsets = [start_offset + sum(len(t.token) for t in tokens[:i]) for i in range(len(tokens))]
        return cls(text_offset=offsets, token_logprobs=[t.logprob for t in tokens], tokens=[t.token for t in tokens],
                   top_logprobs=[dict(t.top) for t in tokens])


class FunctionCall(ApiModel):
    name: str
    arguments: str
    """JSON text."""


class AnswerToolCall(ApiModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(ApiModel):
    name: str | None = _absent_if_none()
    arguments: str | None = _absent_if_none()
    """The next piece of the arguments' JSON text."""


class ToolCallDelta(ApiModel):
    index: int
    """Which call of the answer this piece belongs to."""
    id: str | None = _absent_if_none()
    type: Literal["function"] | None = _absent_if_none()
    function: FunctionCallDelta


class AssistantMessage(ApiModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """Null when the answer is tool calls."""
    tool_calls: list[AnswerToolCall] = Field(default_factory=list)


class ChatChoice(ApiModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(ApiModel):
    role: Literal["assistant"] | None = _absent_if_none()
    content: str | None = _absent_if_none()
    tool_calls: list[ToolCallDelta] | None = _absent_if_none()


class ChatChunkChoice(ApiModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = _absent_if_none()
    """On the last chunk (whose `choices` is empty) when `stream_options.include_usage` is true, and
    the usage so far on every chunk with `continuous_usage_stats` too."""


class CompletionChoice(ApiModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Answer):
    """OpenAI streams completions as `text_completion` objects, each holding the new text."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = _absent_if_none()


class ModelCard(ApiModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pdserve"
    max_model_len: int
    """Context length in tokens (prompt plus generated), as vLLM reports it."""


class ModelList(ApiModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(ApiModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ApiModel):
    """OpenAI's error body: every non-2xx answer, and the last event of a stream that failed."""

    error: ErrorDetail



def error_docs(*more: tuple[int | str, str], only: tuple[int, ...] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of a route's OpenAI error answers: 400, 401, 404 (or `only` those), and `more`."""
    common = ((400, "Invalid request"), (401, "No valid API key (the service has keys)"), (404, "Unknown model"))
    chosen = [(code, what) for code, what in common if only is None or code in only]
    return {code: {"model": ErrorResponse, "description": what} for code, what in (*chosen, *more)}
