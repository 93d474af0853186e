"""Predicted latencies of an engine instance, from its accelerator's profile corrected
online by what the instance actually did.

Prefill is compute-bound: its time grows with the tokens ahead of the request in the
instance's queue plus its own prompt. A decode step reads every running sequence's
KV: its time grows with the batch and with the context held by the batch. Both are
linear here: a fixed part and a per-token part. Each part has its own correction, since one
factor for both learns from whichever requests come most: a factor learned from short chats
(fixed cost) mispredicts a long prompt (per-token cost) by the ratio of the two parts' errors,
about 4x too fast on this project's CPU engines (`tests/controller/test_latency_model.py`).
What a straight line misses on a given instance (a slower part, a noisy neighbour, attention's
quadratic term) is absorbed by the corrections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Correction:
    """observed / predicted latency of one phase (of an instance, or of an accelerator type), one
    factor for the prediction's fixed part and one for its per-token part, fitted in log space
    (2x slower and 2x faster weigh the same) and clipped so that a single outlier cannot take an
    instance out of routing.

    Each observation takes a normalized step on its squared log error (normalized least mean
    squares): the corrected prediction of what was observed moves `alpha` of the way to it, each
    factor in proportion to its part's share of the prediction. A short prompt so corrects mostly
    the fixed cost and a long one mostly the per-token cost; with one part alone it is an
    exponentially weighted mean of observed / predicted."""

    fixed: float = 1.0
    """Factor on the fixed part (a prefill's base cost; a step's base and per-sequence cost)."""
    per_token: float = 1.0
    """Factor on the per-token part (prompt and queued tokens; the batch's context)."""
    observations: int = 0
    alpha: float = 0.2
    """Step of the fit: the weight of the newest observation where one part makes the prediction."""
    limit: float = 8.0
    """Both factors stay within [1/limit, limit]."""
    half_life_s: float = 30.0
    """Evidence of slowness fades at this pace (toward the profile, or toward what the instance's
    type shows), so that an instance once seen slow, and refused every request since (so never
    observed again), gets requests again and is re-measured. Evidence of speed does not fade: on a
    profile slower than the hardware, fading would make predictions ever more pessimistic with
    nothing admitted to disprove them."""
    fade_after_s: float = 30.0
    """Slowness fades only once nothing has been observed for this long: a fade between
    observations pulls a correction that is still being measured back toward the profile, and
    held an engine twice as slow as its profile at about 1.4x (a queue behind it predicted at
    1.7 ms per prompt token, served at 3)."""
    decayed_at_s: float | None = None
    quiet_since_s: float | None = None
    """Since when nothing was observed (as of the last `decay_to`); None: observed since then."""

    def ms(self, fixed_ms: float, token_ms: float) -> float:
        """The corrected prediction of a profile's `fixed_ms` + `token_ms`."""
        return self.fixed * fixed_ms + self.per_token * token_ms

    def observe(self, fixed_ms: float, token_ms: float, observed_ms: float) -> None:
        """The profile predicted `fixed_ms` + `token_ms`; it took `observed_ms`."""
        predicted_ms = self.ms(fixed_ms, token_ms)
        if predicted_ms <= 0 or observed_ms <= 0:
            return
        self.observations += 1
        self.quiet_since_s = None
        fixed_share = self.fixed * fixed_ms / predicted_ms
        step = self.alpha * math.log(observed_ms / predicted_ms) / (fixed_share**2 + (1.0 - fixed_share) ** 2)
        self.fixed = self._bounded(math.log(self.fixed) + step * fixed_share)
        self.per_token = self._bounded(math.log(self.per_token) + step * (1.0 - fixed_share))

    def decay_to(self, now_s: float, toward: tuple[float, float] = (1.0, 1.0)) -> None:
        """Let the evidence of slowness beyond `toward` (fixed, per-token) fade for the time since
        the last call that lies `fade_after_s` or more after the last observation (idempotent for a
        given `now_s`)."""
        if self.quiet_since_s is None:
            self.quiet_since_s = now_s
        if self.decayed_at_s is not None:
            fading_s = now_s - max(self.decayed_at_s, self.quiet_since_s + self.fade_after_s)
            if fading_s > 0:
                fade = 0.5 ** (fading_s / self.half_life_s)
                self.fixed = _faded(self.fixed, toward[0], fade)
                self.per_token = _faded(self.per_token, toward[1], fade)
        self.decayed_at_s = now_s if self.decayed_at_s is None else max(self.decayed_at_s, now_s)

    def _bounded(self, log_factor: float) -> float:
        bound = math.log(self.limit)
        return math.exp(min(bound, max(-bound, log_factor)))


def _faded(factor: float, toward: float, fade: float) -> float:
    return toward * math.exp(math.log(factor / toward) * fade) if factor > toward else factor


@dataclass
class InstanceCorrection:
    """One instance's correction for one phase: its accelerator type's, which every instance of
    the type feeds, times what the instance itself shows over its type, once it has `min_own`
    observations. A new replica, or a decode instance's first local prefills, so start from what
    its type has shown, and an instance keeps following its type between observations of its own:
    learned apart, a decode instance's local-prefill correction came from three prefills made while
    every engine was still slow and stayed there, since the prefill instance then looked faster and
    took every short prompt, which then moved its KV although the decode engine would have given
    its first token sooner (`tests/controller/test_slo_router.py`)."""

    shared: Correction
    own: Correction = field(default_factory=Correction)
    """The instance over its type: 1 where it runs as its type does."""
    min_own: int = 3

    @property
    def current(self) -> Correction:
        if self.own.observations < self.min_own:
            return self.shared
        s, o = self.shared, self.own
        return Correction(fixed=s._bounded(math.log(s.fixed * o.fixed)),
                          per_token=s._bounded(math.log(s.per_token * o.per_token)), observations=o.observations)

    def observe(self, fixed_ms: float, token_ms: float, observed_ms: float) -> None:
        """The type learns first, and the instance what its type's corrected prediction still misses,
        so that the two together move no further than the observation (each learning it whole, a
        lone instance's prediction overshot it)."""
        self.shared.observe(fixed_ms, token_ms, observed_ms)
        self.own.observe(self.shared.fixed * fixed_ms, self.shared.per_token * token_ms, observed_ms)

    def decay_to(self, now_s: float) -> None:
        """Slowness fades: the type's toward its profile, an instance's own toward its type, so that an
        instance left idle is predicted as its busy siblings are, not at the profile (seen on two CPU
        engines: one served 90% of the requests, the other idled at the profile's prediction)."""
        self.shared.decay_to(now_s)
        self.own.decay_to(now_s)


def prefill_stall_ms(tokens: np.ndarray | int, chunk_tokens: np.ndarray | int, fixed_ms: np.ndarray | float,
                     per_token_ms: np.ndarray | float) -> np.ndarray:
    """What prefilling `tokens` prompt tokens adds, in all, to the steps of the answers decoding on the
    same instance: each chunk (`chunk_tokens`, 0: the whole prompt in one step) rides on one of their
    steps and costs a prefill of its length, fixed part included. Scalars or per-instance arrays."""
    return chunks_of(tokens, chunk_tokens) * fixed_ms + per_token_ms * tokens


def chunks_of(tokens: np.ndarray | int, chunk_tokens: np.ndarray | int) -> np.ndarray:
    """The steps that prefill a `tokens`-token prompt, one chunk each (`chunk_tokens`, 0: one step)."""
    return -(-np.asarray(tokens) // np.maximum(chunk_of(tokens, chunk_tokens), 1))


def chunk_of(tokens: np.ndarray | int, chunk_tokens: np.ndarray | int) -> np.ndarray:
    """The prompt tokens one step prefills of a `tokens`-token prompt, in chunks of `chunk_tokens`
    (0: the whole prompt in one step)."""
    return np.where(np.asarray(chunk_tokens) > 0, np.minimum(chunk_tokens, tokens), tokens)


def transfer_ms(tokens: np.ndarray | int, kv_bytes_per_token: int, gbps: float, setup_ms: float = 0.0
                ) -> np.ndarray | float:
    """How long moving `tokens` tokens of KV takes over a link of `gbps`, `setup_ms` included."""
    return setup_ms + tokens * (kv_bytes_per_token * 8 / (gbps * 1e6))  # one array operation for per-instance tokens
