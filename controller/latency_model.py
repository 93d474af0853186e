"""Predicted latencies of an engine instance, from its accelerator's profile corrected
online by what the instance actually did.

Prefill is compute-bound: its time grows with the tokens ahead of the request in the
instance's queue plus its own prompt. A decode step reads every running sequence's
KV: its time grows with the batch and with the context held by the batch. Both are
linear here; what a straight line misses on a given instance (a slower part, a noisy
neighbour, attention's quadratic term) is absorbed by the per-instance correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Correction:
    """observed / predicted latency of one phase (of an instance, or of an accelerator type): an exponentially weighted
    mean in log space (2x slower and 2x faster weigh the same), clipped so that a single
    outlier cannot take an instance out of routing."""

    factor: float = 1.0
    observations: int = 0
    alpha: float = 0.2
    """Weight of the newest observation."""
    limit: float = 8.0
    """The factor stays within [1/limit, limit]."""
    half_life_s: float = 30.0
    """Evidence of slowness fades at this pace (toward the profile, or toward what the instance's
    type shows), so that an instance once seen slow, and refused every request since (so never
    observed again), gets requests again and is re-measured. Evidence of speed does not fade: on a
    profile slower than the hardware, fading would make predictions ever more pessimistic with
    nothing admitted to disprove them."""
    decayed_at_s: float | None = None

    def observe(self, predicted_ms: float, observed_ms: float) -> None:
        if predicted_ms <= 0 or observed_ms <= 0:
            return
        self.observations += 1
        log_f = (1 - self.alpha) * math.log(self.factor) + self.alpha * math.log(observed_ms / predicted_ms)
        bound = math.log(self.limit)
        self.factor = math.exp(min(bound, max(-bound, log_f)))

    def decay_to(self, now_s: float, toward: float = 1.0) -> None:
        """Let the evidence of slowness beyond `toward` fade for the time since the last call
        (idempotent for a given `now_s`)."""
        if self.decayed_at_s is not None and now_s > self.decayed_at_s and self.factor > toward:
            fade = 0.5 ** ((now_s - self.decayed_at_s) / self.half_life_s)
            self.factor = toward * math.exp(math.log(self.factor / toward) * fade)
        self.decayed_at_s = now_s if self.decayed_at_s is None else max(self.decayed_at_s, now_s)


@dataclass
class InstanceCorrection:
    """One instance's correction for one phase. Until the instance has `min_own` observations
    of its own it uses its accelerator type's, which every instance of the type feeds: a new
    replica, or a decode instance's first local prefills, start from what its type has shown."""

    shared: Correction
    own: Correction = field(default_factory=Correction)
    min_own: int = 3

    @property
    def factor(self) -> float:
        return self.own.factor if self.own.observations >= self.min_own else self.shared.factor

    def observe(self, predicted_ms: float, observed_ms: float) -> None:
        self.own.observe(predicted_ms, observed_ms)
        self.shared.observe(predicted_ms, observed_ms)

    def decay_to(self, now_s: float) -> None:
        """An instance's own slowness fades toward its type's factor where the type runs faster than
        the profile: an instance left idle fading to the profile would look slower than its busy
        siblings, and get no requests to show otherwise (seen on two CPU engines: one served 90% of
        the requests, the other idled at the profile's prediction). Where the type runs slower, to
        the profile, as any slowness does."""
        self.shared.decay_to(now_s)
        self.own.decay_to(now_s, toward=min(self.shared.factor, 1.0))
