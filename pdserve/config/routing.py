"""The controller's section of the cluster config: which routing policy, and the numbers
the SLO-aware one predicts with (a latency profile per accelerator type, which the autoscaling
policy file uses too)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LatencyProfile(BaseModel):
    """Latency coefficients of one accelerator type running the served model; a few
    requests measure them (`pdserve bench route --help` says how), the online correction
    keeps them honest."""

    model_config = ConfigDict(extra="forbid")

    prefill_base_ms: float = Field(ge=0)
    """Fixed cost of a prefill (scheduling, sampling, the first token's output)."""
    prefill_ms_per_token: float = Field(gt=0)
    """Compute per prompt token."""
    decode_base_ms: float = Field(gt=0)
    """Step time of a batch of one with a short context."""
    decode_ms_per_seq: float = Field(ge=0)
    """Step time added by each running sequence."""
    decode_ms_per_1k_context_tokens: float = Field(ge=0)
    """Step time added per 1,000 tokens of context held by the batch (attention reads)."""

    def prefill_parts_ms(self, prompt_tokens: int, queued_tokens: int) -> tuple[float, float]:
        """A prefill's time behind `queued_tokens`: (fixed part, per-token part), which the
        controller corrects apart."""
        return self.prefill_base_ms, self.prefill_ms_per_token * (queued_tokens + prompt_tokens)

    def prefill_ms(self, prompt_tokens: int, queued_tokens: int) -> float:
        return sum(self.prefill_parts_ms(prompt_tokens, queued_tokens))

    def step_parts_ms(self, batch: int, context_tokens: int) -> tuple[float, float]:
        """A decode step's time: (fixed part, per-token part: the batch's context)."""
        return (self.decode_base_ms + self.decode_ms_per_seq * batch,
                self.decode_ms_per_1k_context_tokens * context_tokens / 1000.0)

    def step_ms(self, batch: int, context_tokens: int) -> float:
        return sum(self.step_parts_ms(batch, context_tokens))


# From `pdserve bench slo --config bench/cpu_float32.yaml` on the 2-core development machine (no
# GPU), SmolLM2-135M-Instruct in float32, one engine per core: unloaded TTFT 644 ms for a 14-token
# prompt and 1675 ms for 1000 tokens, TPOT 99-112 ms. The batch and context terms are estimates.
CPU_PROFILE = LatencyProfile(prefill_base_ms=630.0, prefill_ms_per_token=1.05, decode_base_ms=95.0,
                             decode_ms_per_seq=5.0, decode_ms_per_1k_context_tokens=10.0)


class FairAdmission(BaseModel):
    """Admission that starves no kind of request (`controller/admission.py`): SLO-aware admission
    alone refuses every long prompt under overload, since short ones keep the queues just short
    enough for themselves."""

    model_config = ConfigDict(extra="forbid")

    max_wait_s: float = Field(5.0, ge=0)
    """A kind refused this long with none of it admitted gets room kept for it: the instance that
    would prefill its latest refused request soonest takes other kinds' prompts only while that
    request would still meet its TTFT objective there. 0: off (every request judged alone)."""
    prompt_class_bounds_tokens: list[int] = Field(default_factory=lambda: [256, 2048])
    """Upper bounds (inclusive, ascending) of the prompt-length kinds: [256, 2048] makes three,
    up to 256 tokens, 257-2048 and longer."""

    @field_validator("prompt_class_bounds_tokens")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or v != sorted(set(v)):
            raise ValueError(f"must be positive and strictly ascending, got {v}")
        return v


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["slo", "least_load"] = "slo"
    """"slo": the pair predicted to meet the request's objectives, refusing early what none
    would meet; "least_load": the least-loaded instance of each pool (the baseline)."""
    priority_margin: float = Field(0.1, ge=0, le=0.5)
    """A request of priority p must be predicted to meet its objectives with a margin of
    p x this fraction of them, so lower priorities are refused first as load grows."""
    local_prefill_max_tokens: int | None = Field(None, ge=0)
    """Prompts up to this many tokens may be prefilled on the decode instance itself, when
    that is predicted to give the first token sooner than a prefill instance plus the KV
    transfer; 0 always disaggregates. None: 64 in disaggregated mode (a decode engine prefills
    a prompt in one step there, stalling its batch), no limit in adaptive mode (chunked prefill
    stalls each step by one chunk, which the router weighs)."""
    intra_node_kv_gbps: float = Field(10.0, gt=0)
    """KV transfer bandwidth between instances on one node, in gigabits per second."""
    inter_node_kv_gbps: float = Field(10.0, gt=0)
    """The same between nodes; set it lower when that network is slow and the router weighs
    same-node pairs accordingly."""
    kv_transfer_setup_ms: float = Field(15.0, ge=0)
    """What moving a prompt's KV costs beyond its bytes over the link, before the decode instance
    goes on: the transfer opened, the last layers handed over after the prefill, the decode engine
    loading them at its next step. The default is this project's CPU engines' (a 16-token prompt's
    KV was exposed 17-19 ms after its prefill, `pdserve bench kv`). Without it a short prompt's
    paths differ by well under a millisecond of bytes, and whichever engine the latency model had
    last seen faster took it: every short prompt moved its KV although the decode engine would have
    had its first token sooner (README, "short prompts kept where they decode")."""
    kv_reserve_tokens: int = Field(256, ge=0)
    """Output tokens of KV room a decode instance must have free for a new request (at most
    its max_tokens), beyond its prompt."""
    tpot_amortize_max_tokens: int = Field(256, ge=0)
    """Adaptive mode: an instance with answers decoding may prefill a prompt whose chunks stretch
    their steps past a TPOT objective, when each answer's TPOT (a mean over its tokens) still
    meets it with every stall booked there spread over its tokens: its max_tokens, at most this
    many (an answer may stop early, and then absorbs less). 0: every step within the objective."""
    hold_recheck_ms: float = Field(200.0, ge=0)
    """With `slo.on_unmeetable: best_effort`: a request that no pair is predicted to serve within its
    objectives (a step past its TPOT, or, adaptive, its prompt's chunks slowing the answers decoding
    where it would be prefilled past theirs) is held at its ingress, which asks again this often,
    while its TTFT objective leaves room for its predicted first token (a prompt queued at a prefill
    instance waits the same way); then it is served on the best pair. 0: served at once."""
    late_hold_max_s: float = Field(30.0, ge=0)
    """With `hold_recheck_ms`: how long past its TTFT objective a held request may wait on when
    served it would push the requests decoding where it goes past their TPOT objectives (its step in
    their batch, or, adaptive, its prompt's chunks beside them). Its own objectives are lost by then;
    served at once it would take them down too, as a prompt in a disaggregated prefill queue does
    not. It waits while its deadline leaves time for its answer, then is served. 0: served at once."""
    ttl_s: float = Field(3.0, gt=0)
    """An instance silent this long gets no new requests until it reports again."""
    channel: Literal["socket", "serve_handle"] = "socket"
    """How ingresses ask the controller for routes. "socket": over a TCP socket of the controller's
    own (length-prefixed JSON, the cluster secret first; `controller/route_server.py`): 0.7 ms
    median per call on the project's 2-core machine against 2.9 ms through Serve's handle
    (`pdserve bench route-call`); while it is not open they use Serve's handle. "serve_handle":
    always Serve's handle. Routing is the same either way."""
    prefix_aware: bool = True
    """Charge a prompt's prefill on each instance only for the tokens its prefix cache does not
    hold (known from the engines' KV cache events), so a conversation's next turn or a shared
    system prompt goes where it is cached; false: every prompt is charged whole (cache-blind)."""
    probe_after_s: float = Field(5.0, ge=0)
    """Once no request has been routed for this long because every pair was predicted to miss,
    the next such request is served best effort as a probe: its latency re-measures predictions
    that would otherwise stay pessimistic with the engines idle (a correction learned under load,
    a profile slower than the hardware), refusing everything for good. 0: never probe."""
    fair_admission: FairAdmission = Field(default_factory=FairAdmission)
    """Keeping room for a kind of request (a prompt-length class) that has waited too long."""
    profiles: dict[str, LatencyProfile] = Field(default_factory=lambda: {"default": CPU_PROFILE})
    """Latency profile per accelerator type (a pool's `accelerator_type`); "default" covers
    pools without one or of a type not listed. Each instance's predictions are corrected
    online from its observed latencies."""

    @field_validator("profiles")
    @classmethod
    def _has_default(cls, v: dict[str, LatencyProfile]) -> dict[str, LatencyProfile]:
        if "default" not in v:
            raise ValueError('needs a "default" profile for instances of unlisted accelerator types')
        return v
