"""The request and its streamed chunks as they travel between pdserve's processes.

The ingresses (HTTP, gRPC) turn their wire formats into a `GenerateRequest`; the
engine replicas answer with `GenerateChunk`s. Both are plain dataclasses because
Ray pickles them between the ingress and the engine replicas.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pdserve.controller.decision import SLO
from pdserve.errors import InvalidRequest
from pdserve.prefill.structured import StructuredOutput

MAX_STOP_CHARS = 256
"""Longest stop string: vLLM holds back up to its length - 1 characters of a streamed answer, and
looks for every stop string in the new text at each step."""
MAX_LOGPROBS = 20
"""Most alternatives a request may ask logprobs of per token: vLLM's default `max_logprobs`."""
SAMPLED_TOKENS_KEY = "pdserve_sampled_tokens"
"""`SamplingParams.extra_args` entry of an engine call: tokens of this answer already sampled
(elsewhere), at the end of its prompt (`GenerateRequest.sampled_tokens`)."""
MAX_SESSION_ID_CHARS = 256
"""Longest session id kept (the controller keeps up to 100,000 sessions)."""
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS_TOKENS = 1024
"""Bounds on per-request token lists, which vLLM copies into every step's batch metadata."""


class Sampling(BaseModel):
    """Sampling options shared by every API; validated once, here."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int | None = Field(None, ge=1)
    """Tokens to generate at most; None means up to the model's context length."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    """0 is greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    """Generation ends before the first of these strings; it is not returned."""
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    """Per-request sampling seed, for repeatable sampling at temperature > 0. An int64, as in the
    gRPC API: vLLM seeds a torch.Generator with it inside the engine, where a value beyond 64 bits
    raises and fails the engine core, not just the request."""
    ignore_eos: bool = False
    """Generate all `max_tokens` even past the end-of-sequence token: benchmarks use it to
    give requests the output lengths of a workload, whatever the model would say."""
    top_k: int = Field(0, ge=-1)
    """Sample among the k likeliest tokens; 0 and -1 mean all (vLLM's convention)."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Both count the answer's own tokens, those sampled by an earlier engine too (the worker
    extension counts them: prefill/worker_extension.py)."""
    repetition_penalty: float = Field(1.0, gt=0.0)
    """Computed over prompt and answer, so an answer split across engines (its tokens become the
    next engine's prompt) is penalised as one run is."""
    min_tokens: int = Field(0, ge=0)
    """End of sequence and stop tokens are masked until this many tokens; carried over to a
    continuing engine as what is left (`remaining_min_tokens`)."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Report each token's log-probability and those of this many likeliest alternatives; None: none."""
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS_TOKENS)
    """Token id -> bias added to its logit, -100..100 (OpenAI's range)."""
    skip_special_tokens: bool = True
    """Leave the tokenizer's special tokens out of the answer's text; tool-call parsers whose
    models mark calls with special tokens (`<tool_call>` in Hermes) need them kept."""
    structured: StructuredOutput | None = None
    """The answer held to a JSON schema, a regex, a grammar...; on every engine that samples it, from
    where the answer stands (`grammar_carry.py`)."""

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int]) -> list[int]:
        if any(not 0 <= t < 2**31 for t in v):
            raise ValueError("token ids are non-negative int32 values")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        if any(not 0 <= t < 2**31 for t in v):
            raise ValueError("keys are token ids: non-negative int32 values")
        if any(not -100.0 <= b <= 100.0 for b in v.values()):
            raise ValueError("biases are between -100 and 100")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens_fit(cls, v: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and v > max_tokens:
            raise ValueError(f"min_tokens ({v}) is more than max_tokens ({max_tokens})")
        if v and info.data.get("stop"):
            # vLLM skips stop strings inside the first min_tokens; the check across an answer's
            # engine seam (deployments/failover.py) counts characters, not tokens, and cannot.
            raise ValueError("min_tokens together with stop strings is not supported")
        return v

    def remaining_min_tokens(self, sampled_tokens: int, max_tokens: int) -> int:
        """min_tokens for an engine call that goes on after `sampled_tokens` of the answer and may
        generate `max_tokens` (vLLM refuses more than that)."""
        return min(max(0, self.min_tokens - sampled_tokens), max_tokens)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return [] if v is None else v

    @field_validator("stop")
    @classmethod
    def _non_empty_and_short(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in v):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return v


class Objectives(BaseModel):
    """The latency objectives a client may state for its request (the SLO contract); an
    objective left unset takes the service's default (`slo` in the config)."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float | None = Field(None, gt=0, le=3_600_000)
    """Time to first token, from the request's arrival at the ingress."""
    tpot_ms: float | None = Field(None, gt=0, le=600_000)
    """Mean time per output token after the first."""
    priority: int | None = Field(None, ge=0, le=9)
    """0 is the most important; under load, higher values are refused first."""


@dataclass(frozen=True)
class SLOReport:
    """How a request did against its objectives, measured at the ingress."""

    ttft_ms: float
    tpot_ms: float | None
    """None when the answer had a single token."""
    slo: SLO
    """What the request asked for."""

    @property
    def ttft_met(self) -> bool:
        return self.ttft_ms <= self.slo.ttft_ms

    @property
    def tpot_met(self) -> bool:
        return self.tpot_ms is None or self.tpot_ms <= self.slo.tpot_ms

    def as_dict(self) -> dict[str, Any]:
        return {"ttft_ms": round(self.ttft_ms, 3), "tpot_ms": None if self.tpot_ms is None else round(self.tpot_ms, 3),
                "ttft_objective_ms": self.slo.ttft_ms, "tpot_objective_ms": self.slo.tpot_ms,
                "ttft_met": self.ttft_met, "tpot_met": self.tpot_met, "priority": self.slo.priority}


@dataclass
class GenerateRequest:
    """One request, tokenized and validated by the ingress."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    slo: SLO
    trace_carrier: dict[str, str] = field(default_factory=dict)
    """W3C trace context of the ingress span, so engine spans join the request's trace."""
    sampled_tokens: int = 0
    """Tokens at the end of `prompt_token_ids` that are the answer's own, sampled by an earlier
    engine call: a seeded generator skips their draws, so the answer goes on as one run would."""
    session_id: str = ""
    """The conversation it is a turn of, as the client names it: the controller sends the next
    turn where this one's KV is (`controller/sessions.py`). "": none."""

    def continued(self, token_ids: list[int], request_id: str | None = None) -> GenerateRequest:
        """The request that goes on after the answer's `token_ids` (sampled elsewhere): the prompt
        followed by them, and the rest of `max_tokens`."""
        assert self.sampling.max_tokens is not None and len(token_ids) < self.sampling.max_tokens
        sampling = self.sampling.model_copy(update={"max_tokens": self.sampling.max_tokens - len(token_ids)})
        return GenerateRequest(request_id or self.request_id, [*self.prompt_token_ids, *token_ids], sampling,
                               self.slo, self.trace_carrier, self.sampled_tokens + len(token_ids), self.session_id)

    def choice(self, index: int) -> GenerateRequest:
        """The request for the answer's choice `index` of several (OpenAI's `n`): its own id and,
        when seeded, vLLM's seed for that child (seed + index), so that each choice is sampled
        apart, and repeatably."""
        sampling = self.sampling
        if sampling.seed is not None:
            sampling = sampling.model_copy(update={"seed": sampling.seed + index})
        return dataclasses.replace(self, request_id=f"{self.request_id}-{index}", sampling=sampling,
                                   trace_carrier=dict(self.trace_carrier))

    def resumed(self, sent_token_ids: list[int], attempt: int) -> GenerateRequest:
        """What a new replica is sent after the one serving this request died, once the client
        has `sent_token_ids`: it goes on from the next token (`continued`). A new id, because
        engines and KV transfers know requests by id and the lost attempt's may still linger."""
        return self.continued(sent_token_ids, f"{self.request_id}-r{attempt}")


def checked_session_id(value: str, field: str) -> str:
    """A client's session id; InvalidRequest naming `field` when it is too long to keep."""
    if len(value) > MAX_SESSION_ID_CHARS:
        raise InvalidRequest(f"{field} names the session and may be at most {MAX_SESSION_ID_CHARS} characters; "
                             f"got {len(value)}", param=field)
    return value


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its likeliest alternatives, as the engine saw them."""

    token: str
    """The token's text, as vLLM decodes a single token."""
    logprob: float
    top: list[tuple[str, float]]
    """The `Sampling.logprobs` likeliest tokens at this position (text, logprob), likeliest first."""


@dataclass
class GenerateChunk:
    """A piece of the answer: new text and tokens since the previous chunk."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far, this chunk's included."""
    finish_reason: str | None = None
    """'stop' or 'length' on the last chunk; None before."""
    kv_transfer: dict[str, Any] | None = None
    """Last chunk of a disaggregated request: how the prompt's KV travelled
    (state, tokens, bytes, prefill_compute_ms, exposed_ms, load_ms)."""
    slo: SLOReport | None = None
    """Last chunk, set by the ingress: measured TTFT and TPOT against the objectives."""
    logprobs: list[TokenLogprob] | None = None
    """One per token of `token_ids`, when the request asked for logprobs."""
    cached_tokens: int | None = None
    """First chunk of an engine that prefilled the prompt: its tokens taken from the engine's prefix
    cache (vLLM's `num_cached_tokens`); the ingress puts the answer's on its last chunk."""
