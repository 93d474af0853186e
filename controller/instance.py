"""One engine instance as the controller knows it: what it last reported, the requests the
controller routed to it (its ledger), and the predictions made from both, which routing reads
as the instance's row of its pool's view (`pool_view.py`).

Load comes from the ledger, exact at once, where a reported count lags by up to a report
interval (an idle instance would look busy, a busy one idle). What an instance reports at first sight and the ledger does not know (requests
routed before a controller restart) is carried beside it and only shrinks, as they finish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.config.cluster import pool_role
from pdserve.config.routing import LatencyProfile
from pdserve.controller.hot_experts import ExpertReport
from pdserve.controller.latency_model import Correction, InstanceCorrection, chunks_of, prefill_stall_ms
from pdserve.controller.pool_view import Row
from pdserve.controller.prefix_index import CacheEvents


@dataclass(frozen=True)
class LoadReport:
    """What an engine replica tells the controller about itself."""

    replica_id: str
    """Ray Serve replica id (unique within the application)."""
    pool: str
    """Its pool (Serve deployment): "prefill", "decode", "colocated", "adaptive" or "adaptive-<name>"."""
    node_id: str
    accelerator_type: str | None
    kv_addr: str
    """host:port of the decode replica's KV receiver; empty for other pools."""
    max_ongoing: int
    """Requests the replica runs at once."""
    started_at_s: float
    """Wall time the replica started: a new value is a new incarnation."""
    running: int = 0
    """Requests the replica is serving now."""
    waiting: int = 0
    """Requests its engine has accepted and not yet scheduled."""
    queued_prefill_tokens: int = 0
    """Prompt tokens it has accepted and not yet prefilled."""
    context_tokens: int = 0
    """Tokens (prompt and generated) held by its running requests."""
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    block_size: int = 16
    """Tokens per KV block."""
    prefill_chunk_tokens: int = 0
    """Most prompt tokens its engine prefills in one step (chunked prefill), so the most one
    step of the requests decoding there stalls for a prompt; 0: a prompt in one step."""
    recent_ttft_ms: float = 0.0
    """Recent prefill time of its requests (moving average; 0 before the first)."""
    recent_tpot_ms: float = 0.0
    """Recent time per output token of its requests (moving average; 0 before the first)."""
    tp_size: int = 1
    """Tensor-parallel ranks of its engine: a transfer to or from it has a part per rank, and rank r's
    KV receiver listens at `kv_addr`'s port + r (`kvtransfer/tp_shards.py`)."""
    experts: ExpertReport | None = None
    """Its expert buffers' counters; None when its MoE layers (if any) keep every expert resident."""
    cache: CacheEvents | None = None
    """What its prefix cache stored and evicted since its previous report (`prefix_index.py`)."""


@dataclass
class Assignment:
    """A request the controller routed to an instance, with what it predicted there."""

    prompt_tokens: int
    prefill_tokens: int
    """The prompt tokens its prefill computes: those its instance's prefix cache did not hold."""
    kv_tokens: int
    """KV room the request takes: its prompt and the output tokens reserved for it."""
    tpot_ms: float
    prefill_pending: bool
    """The instance still has to prefill the prompt (prefill instances, local prefill)."""
    predicted_prefill_ms: tuple[float, float]
    """The profile's prediction before correction (fixed part, per-token part), to correct it by
    what happens; (0, 0) where the instance does not prefill it."""
    predicted_step_ms: tuple[float, float]
    """The same for its decode steps; (0, 0) where the instance does not decode it."""
    assigned_at_s: float
    expires_at_s: float
    """The request's deadline: past it the booking goes, release or not (an ingress that died,
    a release lost on the way)."""
    owner: str = ""
    """The ingress replica that routed it: once Serve no longer runs it, the booking goes ("": none)."""
    answer_tokens: int = 0
    """Output tokens its TPOT objective spreads a stall over: its max_tokens, at most the
    registry's `tpot_amortize_max_tokens` (0 where it does not decode)."""
    absorbed_ms: float = 0.0
    """Stall booked on it since it was routed: the predicted chunks of prompts prefilled next to it."""
    max_tokens: int = 0
    """Output tokens it may make (0 where it does not decode): the most steps a stall can ride."""
    decoding_since_s: float | None = None
    """When its first token came (its prompt prefilled, here or elsewhere); None before."""
    arrives_at_s: float | None = None
    """For an answer whose prompt is prefilled elsewhere: when its first token was predicted to come
    (its KV lands about then); None for one prefilled here."""

    def tpot_slack_ms(self, step_ms: float) -> float:
        """Stall it can still absorb and keep its mean time per token within its objective, at
        steps of `step_ms`."""
        return (self.tpot_ms - step_ms) * (self.answer_tokens - 1) - self.absorbed_ms

    def steps_left(self, now_s: float) -> int:
        """Its steps still to come, at most: its max_tokens less those made since its first token at
        its objective's pace (an answer slower than that is missing its objective already)."""
        made = 0 if self.decoding_since_s is None else int(max(0.0, now_s - self.decoding_since_s) * 1000.0 / self.tpot_ms)
        return max(0, self.max_tokens - 1 - made)


@dataclass(eq=False)
class Instance:
    report: LoadReport
    last_seen_s: float
    profile: LatencyProfile
    node: int
    slot: int = -1
    """Its row in its pool's view."""
    assignments: dict[str, Assignment] = field(default_factory=dict)
    unknown_running: int = 0
    """Requests it reported that the ledger does not know (routed before a controller restart)."""
    unknown_queued_tokens: int = 0
    prefill_fix: InstanceCorrection = field(default_factory=lambda: InstanceCorrection(Correction()))
    step_fix: InstanceCorrection = field(default_factory=lambda: InstanceCorrection(Correction()))

    @property
    def replica_id(self) -> str:
        return self.report.replica_id

    @property
    def view_name(self) -> str:
        """The view it is routed in: its pool's role, so that every adaptive pool is routed as one."""
        return pool_role(self.report.pool)

    @property
    def load(self) -> int:
        return len(self.assignments) + self.unknown_running

    @property
    def full(self) -> bool:
        return self.load >= self.report.max_ongoing

    def queued_prefill_tokens(self) -> int:
        return sum(self._queued_prompts())

    def _queued_prompts(self) -> list[int]:
        """The uncomputed tokens of each prompt queued here (those it reported and the ledger does not know as one)."""
        queued = [a.prefill_tokens for a in self.assignments.values() if a.prefill_pending]
        return queued + [self.unknown_queued_tokens] if self.unknown_queued_tokens else queued

    def decoding(self) -> int:
        return self.unknown_running + sum(1 for a in self.assignments.values() if not a.prefill_pending)

    def context_tokens(self) -> int:
        return max(self.report.context_tokens, sum(a.prompt_tokens for a in self.assignments.values()))

    def raw_prefill_ms(self, prompt_tokens: int) -> tuple[float, float]:
        """The profile's prefill time of `prompt_tokens` behind this instance's queue: (fixed part,
        per-token part)."""
        return self.profile.prefill_parts_ms(prompt_tokens, self.queued_prefill_tokens())

    def raw_step_ms(self, prompt_tokens: int) -> tuple[float, float]:
        """The profile's step time with one more sequence of `prompt_tokens` decoding here: (fixed
        part, per-token part)."""
        return self.profile.step_parts_ms(self.decoding() + 1, self.context_tokens() + prompt_tokens)

    def prefill_parts_ms(self) -> tuple[float, float]:
        """One prefill's fixed cost and its time per token, corrected by what this instance did."""
        prefill = self.prefill_fix.current
        return prefill.fixed * self.profile.prefill_base_ms, prefill.per_token * self.profile.prefill_ms_per_token

    def prefill_stall_ms(self, tokens: int) -> float:
        """What prefilling `tokens` here adds to the steps of the answers decoding here, corrected."""
        return float(prefill_stall_ms(tokens, self.report.prefill_chunk_tokens, *self.prefill_parts_ms()))

    def queued_stall_ms(self) -> float:
        """What the prompts queued here add to the steps of an answer decoding here meanwhile, corrected."""
        return sum(self.prefill_stall_ms(tokens) for tokens in self._queued_prompts())

    def chunk_stall_ms(self) -> float:
        """What one whole chunk adds to a step of the answers decoding here (chunked prefill), corrected."""
        fixed_ms, per_token_ms = self.prefill_parts_ms()
        return fixed_ms + per_token_ms * self.report.prefill_chunk_tokens

    def queued_chunks(self) -> int:
        """Steps that carry the chunks of the prompts queued here, before a prompt routed now."""
        return sum(int(chunks_of(tokens, self.report.prefill_chunk_tokens)) for tokens in self._queued_prompts())

    def exposed_steps(self, a: Assignment, queued_chunks: int) -> int:
        """Steps of answer `a` that a prompt queued here now would ride: those left after the queued
        chunks' (all of them while its first token has not come: it may start behind them)."""
        left = a.steps_left(self.last_seen_s)
        return left if a.decoding_since_s is None else max(0, left - queued_chunks)

    def lead_chunks(self, a: Assignment, queued_chunks: int) -> int:
        """Chunks of a prompt routed now that are prefilled before answer `a` lands here (its prompt
        prefilled elsewhere, predicted to finish later), and so do not slow it: those that fit
        after the queued chunks and before its predicted first token."""
        if a.decoding_since_s is not None or a.arrives_at_s is None:
            return 0
        ahead_ms = (a.arrives_at_s - self.last_seen_s) * 1e3
        return max(0, int(ahead_ms // max(self.chunk_stall_ms(), 1e-9)) - queued_chunks)

    def stall_on_ms(self, a: Assignment, tokens: int, queued_chunks: int) -> float:
        """What prefilling `tokens` here adds to answer `a`'s steps: each of its chunks rides one
        of them, as long as the answer is here and has steps left to ride."""
        chunks = int(chunks_of(tokens, self.report.prefill_chunk_tokens))
        riding = min(max(0, chunks - self.lead_chunks(a, queued_chunks)), self.exposed_steps(a, queued_chunks))
        return self.prefill_stall_ms(tokens) if riding >= chunks else riding * self.chunk_stall_ms()

    def absorbable_chunks(self, step_ms: float) -> float:
        """Most chunks of a prompt routed now that the answers decoding here take within their TPOT
        objectives at steps of `step_ms`: an answer takes as many as its room holds, or any number
        when fewer of its steps are left, and the chunks prefilled before it lands besides (inf: no
        answer limits it)."""
        if not self.report.prefill_chunk_tokens:
            return float("inf")
        queued, chunk_ms = self.queued_chunks(), self.chunk_stall_ms()
        holds = [(a.tpot_slack_ms(step_ms) / chunk_ms, self.exposed_steps(a, queued), self.lead_chunks(a, queued))
                 for a in self.assignments.values() if a.kv_tokens]
        return min((max(math.floor(k), 0) + lead for k, exposed, lead in holds if exposed > max(k, 0)),
                   default=float("inf"))

    def row(self) -> Row:
        r, p = self.report, self.profile
        pending_kv = sum(a.kv_tokens for a in self.assignments.values() if a.assigned_at_s > self.last_seen_s)
        tpots = [a.tpot_ms for a in self.assignments.values()]
        prefill, step = self.prefill_fix.current, self.step_fix.current
        prefill_fixed_ms, prefill_ms_per_token = self.prefill_parts_ms()
        step_base_ms = step.ms(*self.raw_step_ms(0))
        return Row(
            replica_id=r.replica_id, kv_addr=r.kv_addr, pool=r.pool,
            step_base_ms=step_base_ms,
            step_ms_per_token=step.per_token * p.decode_ms_per_1k_context_tokens / 1000.0,
            prefill_base_ms=prefill.ms(*self.raw_prefill_ms(0)),
            prefill_ms_per_token=prefill_ms_per_token, prefill_fixed_ms=prefill_fixed_ms, last_seen_s=self.last_seen_s,
            tpot_floor_ms=min(tpots, default=float("inf")),
            tpot_slack_ms=min((a.tpot_slack_ms(step_base_ms) for a in self.assignments.values() if a.kv_tokens),
                              default=float("inf")),
            queued_stall_ms=self.queued_stall_ms(), absorbable_chunks=self.absorbable_chunks(step_base_ms),
            free_kv_tokens=float(r.free_kv_blocks * r.block_size - pending_kv),
            load=self.load, max_ongoing=r.max_ongoing, node=self.node, prefill_chunk_tokens=r.prefill_chunk_tokens,
            tp_size=r.tp_size,
        )
