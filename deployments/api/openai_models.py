"""OpenAI's chat and completions request bodies, as far as pdserve serves them (the answers:
`openai_answers.py`).

Requests declare the fields pdserve honours and validate them strictly: `"max_tokens": "5"`
is a 400, not a silent coercion. Any other field is refused with a 400 naming it, unless it
asks for nothing (`vllm_fields.py`: null, or vLLM's default), so no field is silently dropped.
Value ranges are checked once, by `Sampling`, whose errors come back naming the request field.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Annotated, Any, ClassVar

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from pdserve.deployments.api.chat_messages import ChatMessage
from pdserve.deployments.api.structured_fields import ResponseFormat, StructuredOutputsBody
from pdserve.deployments.api.tools import ForcedCall, Tool, ToolChoice, forced_call
from pdserve.deployments.api.vllm_fields import StrictBody, field_table, one_of, refusal, vllm_request_models
from pdserve.errors import InvalidRequest
from pdserve.prefill.requests import Objectives, Sampling, checked_session_id
from pdserve.prefill.structured import StructuredOutput

OBJECTIVE_HEADERS = {"ttft_ms": "x-pdserve-ttft-ms", "tpot_ms": "x-pdserve-tpot-ms", "priority": "x-pdserve-priority"}
"""Request headers that carry the objectives when the body does not (e.g. set by a gateway)."""
SESSION_HEADER = "x-pdserve-session-id"
"""Request header naming the conversation a request is a turn of (else the body's `user`)."""
FIELD_NOTES = {"user": "pdserve's use: names the session (unless the header x-pdserve-session-id does), whose "
                       "turns go where their KV is; at most 256 characters",
               "response_format": "honoured: text, json_object, json_schema (not structural_tag)",
               "structured_outputs": "honoured: json, json_object, regex, choice, grammar (not structural_tag)",
               "tool_choice": "honoured: none, required, a named function; auto with the service's "
                              "`tool_call_parser` (vLLM's), refused without one",
               "tools": "honoured: functions (given to the chat template; a forced call is held to them)",
               "priority": "pdserve's meaning: 0-9, refused first under load",
               "ttft_ms": "pdserve's: TTFT objective", "tpot_ms": "pdserve's: TPOT objective"}
"""What a field pdserve declares does, where that is not what vLLM's field of the name does."""
MAX_CHOICES = 16
"""Most answers one request may ask for (`n`): each is routed, prefilled and decoded as a request
of its own (they share the prompt's KV only through an engine's prefix cache)."""
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for /v1/completions (chat has none: up to the context length)."""


def field_path(loc: Sequence[int | str]) -> str:
    """`("messages", 0, "role")` -> `messages[0].role`: how a user would name the field."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).removeprefix(".")


def invalid_request(errors: Sequence[ErrorDetails], renames: dict[str, str] | None = None) -> InvalidRequest:
    """One InvalidRequest for pydantic errors: the message lists each field and problem (up to 3),
    `param` names the first field. `renames` maps a model's field to the request field it came from."""
    parts, params = [], []
    for err in errors[:3]:
        path = field_path(err["loc"])
        path = (renames or {}).get(path, path)
        params.append(path)
        msg = refusal(str(err["loc"][-1])) if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        parts.append(f"Invalid '{path}': {msg}" if path else f"Invalid request body: {msg}")
    return InvalidRequest("; ".join(parts), param=params[0] if params and params[0] else None)


StopField = Annotated[str | list[str] | None, one_of("a string, a list of strings or null")]
PromptField = Annotated[str | list[int] | list[str], one_of("a string, a list of token ids or a list of one string")]


class StreamOptions(StrictBody):
    vllm_api: ClassVar[str | None] = "stream_options"
    include_usage: bool = False
    """Send a last chunk with empty `choices` and the request's token usage."""
    continuous_usage_stats: bool = False
    """vLLM's extension: with `include_usage`, every chunk also carries the usage so far."""


class GenerationRequest(StrictBody, ABC):
    """Fields chat and completions share."""

    model: str
    temperature: float | None = None
    """0..2; 0 is greedy; null means 1."""
    top_p: float | None = None
    """(0, 1]; null means 1."""
    stop: StopField = None
    """Up to 4 strings; generation ends before the first one, which is not returned."""
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Answers to sample for the prompt; choice i is seeded with seed + i, as in vLLM."""
    top_k: int | None = None
    """vLLM's extension: sample among the k likeliest tokens; 0 or -1 (or null): all."""
    min_p: float | None = None
    """vLLM's extension, 0..1: drop tokens less likely than min_p times the likeliest."""
    presence_penalty: float | None = None
    """-2..2, subtracted from the logit of every token already in the answer."""
    frequency_penalty: float | None = None
    """-2..2, times how often a token is already in the answer, subtracted from its logit."""
    repetition_penalty: float | None = None
    """vLLM's extension, > 0: above 1 discourages tokens already in the prompt or the answer."""
    min_tokens: int | None = None
    """vLLM's extension: no end of sequence or stop token (and no stop string: refused together)
    before this many tokens."""
    stop_token_ids: list[int] | None = None
    """vLLM's extension: token ids that end the answer (the token is not in the text)."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> -100..100, added to that token's logit before sampling."""
    response_format: ResponseFormat | None = None
    """OpenAI's JSON mode (`json_object`) and structured outputs (`json_schema`)."""
    structured_outputs: StructuredOutputsBody | None = None
    """vLLM's structured outputs; not together with a JSON `response_format`."""
    ignore_eos: bool | None = None
    """vLLM's extension: keep generating past end of sequence, up to the token limit (benchmarks)."""
    skip_special_tokens: bool | None = None
    """vLLM's extension: false keeps the tokenizer's special tokens in the text (null: true)."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """OpenAI's end-user id; pdserve takes it as the session (the conversation a request is a turn
    of) unless the header `x-pdserve-session-id` names one."""
    ttft_ms: float | None = None
    """pdserve's SLO contract (OpenAI clients send it in `extra_body`, or as the header
    `x-pdserve-ttft-ms`): time-to-first-token objective in ms; unset: the service's default."""
    tpot_ms: float | None = None
    """Time-per-output-token objective in ms (header `x-pdserve-tpot-ms`)."""
    priority: int | None = None
    """0 (most important) to 9; under load higher values are refused first (header `x-pdserve-priority`)."""

    @field_validator("n")
    @classmethod
    def _seeds_fit(cls, n: int, info: ValidationInfo) -> int:
        seed = info.data.get("seed")
        if seed is not None and seed + n - 1 >= 2**63:
            raise PydanticCustomError("unsupported", "seed + n - 1 (the last choice's seed) must fit in 64 bits")
        return n

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise PydanticCustomError("unsupported", "stream_options is only allowed when stream is true")
        return options

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Whether every chunk of a streamed answer carries the usage so far (vLLM's rule: only
        together with `include_usage`)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def session(self, headers: Mapping[str, str]) -> str:
        """The session this request is a turn of: the `x-pdserve-session-id` header, else `user`;
        InvalidRequest naming the one that is too long."""
        if (header := headers.get(SESSION_HEADER)) is not None:
            return checked_session_id(header, SESSION_HEADER)
        return checked_session_id(self.user or "", "user")

    def objectives(self, headers: Mapping[str, str]) -> Objectives:
        """The request's latency objectives: body fields first, else the `x-pdserve-*` headers;
        InvalidRequest naming the field or header when a value is not one."""
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, parse in (("ttft_ms", float), ("tpot_ms", float), ("priority", int)):
            value, source = getattr(self, name), name
            if value is None and (raw := headers.get(OBJECTIVE_HEADERS[name])) is not None:
                source = OBJECTIVE_HEADERS[name]
                try:
                    value = parse(raw)
                except ValueError:
                    raise InvalidRequest(f"Invalid '{source}' header: {raw!r} is not a number", param=source) from None
            if value is not None:
                values[name], sources[name] = value, source
        try:
            return Objectives(**values)
        except ValidationError as e:
            raise invalid_request(e.errors(), renames=sources) from None

    @abstractmethod
    def _max_tokens(self) -> tuple[int | None, str]:
        """The requested token limit and the request field it came from."""

    @abstractmethod
    def _logprobs(self) -> tuple[int | None, str]:
        """How many alternatives to report logprobs of per token (None: no logprobs), and the field."""

    def _constraints(self) -> list[tuple[str, dict[str, Any]]]:
        """Each field that constrains the answer, with the `StructuredOutput` fields it asks for."""
        found: list[tuple[str, dict[str, Any]]] = []
        if self.response_format and self.response_format.type != "text":
            schema = self.response_format.json_schema
            found.append(("response_format", {"json_schema": schema.schema_} if schema else {"json_object": True}))
        if self.structured_outputs:
            found.append(("structured_outputs", self.structured_outputs.constraint()))
        return found

    def structured(self) -> StructuredOutput | None:
        """The answer's constraint, from `response_format`, `structured_outputs` or (chat) a forced
        tool call; InvalidRequest naming the field when two constrain it, or when xgrammar cannot
        compile the constraint."""
        found = self._constraints()
        if len(found) > 1:
            raise InvalidRequest(f"{found[0][0]} and {found[1][0]} both constrain the answer; send one",
                                 param=found[1][0])
        if not found:
            return None
        field, values = found[0]
        try:
            return StructuredOutput(**values)
        except ValidationError as e:
            raise invalid_request([{**err, "loc": (field, *err["loc"])} for err in e.errors()]) from None

    def sampling(self) -> Sampling:
        """The shared sampling options; InvalidRequest (naming the field) when a value is out of range."""
        structured = self.structured()
        max_tokens, max_tokens_field = self._max_tokens()
        logprobs, logprobs_field = self._logprobs()
        values = {"logprobs": logprobs, "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "stop": self.stop, "seed": self.seed, "ignore_eos": self.ignore_eos, "top_k": self.top_k,
                  "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
                  "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "stop_token_ids": self.stop_token_ids, "logit_bias": self.logit_bias, "structured": structured,
                  "skip_special_tokens": self.skip_special_tokens}
        try:
            return Sampling(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise invalid_request(e.errors(), renames={"max_tokens": max_tokens_field,
                                                       "logprobs": logprobs_field}) from None


class ChatCompletionRequest(GenerationRequest):
    """Body of POST /v1/chat/completions."""

    vllm_api: ClassVar[str | None] = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    """Tokens to generate at most (OpenAI's older name); null means up to the context length."""
    max_completion_tokens: int | None = None
    """OpenAI's newer name for `max_tokens`; set either, or both to the same value."""
    logprobs: bool | None = None
    """Report each answer token's log-probability (`choices[].logprobs.content`)."""
    top_logprobs: int | None = None
    """0..20, with `logprobs`: also the log-probabilities of this many likeliest tokens at each position."""
    tools: list[Tool] | None = None
    """Functions the model may call; they reach the chat template (which may show them to the model)."""
    tool_choice: ToolChoice | None = None
    """"required" or a named function: the answer is a call (`tools.py`); "none": text; "auto",
    OpenAI's default with tools: the model decides, its answer read by the service's tool-call
    parser (refused without one)."""
    parallel_tool_calls: bool | None = None
    """false: at most one call ("required": exactly one)."""

    @cached_property
    def tool_plan(self) -> tuple[ForcedCall | None, dict[str, Any] | None]:
        """The call the answer is (None: text) and the schema that holds it (`tools.forced_call`),
        worked out once per request: the sampling options and the answer's reading both need it."""
        return forced_call(self.tools, self.tool_choice, self.parallel_tool_calls)

    def _constraints(self) -> list[tuple[str, dict[str, Any]]]:
        _, schema = self.tool_plan
        return super()._constraints() + ([("tool_choice", {"json_schema": schema})] if schema is not None else [])

    @property
    def auto_tools(self) -> bool:
        """Whether the model decides whether to call a tool (tool_choice "auto", given or implied)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def vllm_auto_tools_request(self) -> Any:
        """The request, with tool_choice "auto", as vLLM's own model, which its tool-call parsers
        take (they read the messages, tools and tool choice)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

        return VllmChatRequest.model_validate(
            self.model_dump(include={"model", "messages", "tools", "parallel_tool_calls"}, exclude_none=True)
            | {"tool_choice": "auto"})

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def _logprobs(self) -> tuple[int | None, str]:
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
            return None, "top_logprobs"
        return self.top_logprobs or 0, "top_logprobs"

    def _max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is None:
            return self.max_tokens, "max_tokens"
        if self.max_tokens not in (None, self.max_completion_tokens):
            raise InvalidRequest("max_tokens and max_completion_tokens differ; set only one",
                                 param="max_completion_tokens")
        return self.max_completion_tokens, "max_completion_tokens"

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as the frontend's chat template takes them."""
        return [m.as_template_dict() for m in self.messages]


class CompletionRequest(GenerationRequest):
    """Body of POST /v1/completions."""

    vllm_api: ClassVar[str | None] = "completions"

    prompt: PromptField
    """Text, token ids, or a batch of exactly one text."""
    max_tokens: int | None = COMPLETION_DEFAULT_MAX_TOKENS
    """Tokens to generate at most; null means OpenAI's default, 16."""
    logprobs: int | None = None
    """0..20: report each answer token's log-probability and those of this many likeliest tokens."""
    echo: bool | None = False
    """The answer's text starts with the prompt's (token ids: their text); not with `logprobs`,
    which would need the prompt's log-probabilities."""

    def _logprobs(self) -> tuple[int | None, str]:
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo with logprobs (the prompt's log-probabilities) is not supported", param="echo")
        return self.logprobs, "logprobs"

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list) and (not prompt or (isinstance(prompt[0], str) and len(prompt) != 1)):
            raise PydanticCustomError("unsupported", "prompt must be a string, non-empty token ids or one string")
        return prompt

    def _max_tokens(self) -> tuple[int | None, str]:
        return (COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens), "max_tokens"

    def prompt_input(self) -> str | list[int]:
        """The prompt as the frontend takes it: text or token ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt  # type: ignore[return-value]  # a list here holds ints


def load_validators() -> None:
    """Import what validating a request imports (vLLM's request models, xgrammar): seconds, paid
    when the ingress starts rather than by its first client."""
    vllm_request_models()
    StructuredOutput(json_object=True)


def readme_field_table() -> str:
    """The README's table of every vLLM request field and what pdserve does with it."""
    return field_table({"chat": ChatCompletionRequest.model_fields, "completions": CompletionRequest.model_fields},
                       FIELD_NOTES)


if __name__ == "__main__":  # regenerates the README's table
    print(readme_field_table())
