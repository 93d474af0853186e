"""Dry run of an autoscaling policy: `desired_replicas` replayed over a request trace, so an
operator sees how the pools would move, what the requests would get and what it would cost
before the policy touches a cluster (`pdserve autoscale --policy P --replay T`).

Every `interval_s` the replay builds the `Signals` the controller would see, calls the same
decision with the memory the previous call returned, and applies the sizes: added replicas
become ready `startup_s` later, removed ones (those still starting first) stop at once. GPU
time counts from when a replica is requested, as a cloud bills it.

The pools are a deliberately simple model, driven by each pool's latency `profile`:
- Prefill is a fluid queue: every arriving prompt joins a backlog of tokens that the ready
  replicas drain at 1000 / prefill_ms_per_token tokens/s each (the fixed cost per batch is
  not charged to throughput). A request's TTFT is the profile's prefill time for its prompt
  behind its share of the backlog (backlog / ready replicas); no transfer or routing time.
- Decode: a request holds a sequence slot from its arrival (its prefill time is not added)
  for output_tokens - 1 steps, each taking the profile's step time at the batch it joins
  (running sequences + 1, spread evenly over the ready replicas) and its context; later
  arrivals do not slow it down. Running sequences are the slots held: Little's law with the
  predicted TPOT. KV memory is not modelled (kv_usage is reported as 0), nor is admission.
- A request arriving while a pool has no ready replica misses its objectives (and holds no
  decode slot).
- "Measured" TTFT and TPOT are the mean predictions for the window's requests, times
  exp(N(0, noise)) drawn from a seeded RNG when `noise` is set, so the decision's
  measured/predicted correction can be exercised.
- Rates are averaged over the last `window_s` (or the time elapsed, early on) of arrivals,
  output tokens included (the live controller counts those as requests finish, later);
  the signals carry both the pool's target (replicas still starting included) and its ready
  replicas, from which latency comes.
A request meets its objectives when its predicted TTFT <= ttft_ms and TPOT <= tpot_ms (a
one-token answer has no TPOT).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from pdserve.config.autoscaling_policy import AutoscalingPolicy
from pdserve.config.routing import LatencyProfile
from pdserve.controller.autoscaling.decision import Memory, PoolSignals, Signals, desired_replicas
from pdserve.controller.autoscaling.trace import TraceRequest

POOLS = ("prefill", "decode")


@dataclass(frozen=True)
class IntervalRow:
    """One decision and the requests that arrived until the next."""

    t_s: float
    arrival_rps: float
    """As the decision saw it: arrivals over the window before t_s."""
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    wanted: dict[str, int]
    """Replicas the decision asked for, per pool."""
    ready: dict[str, int]
    """Replicas serving at t_s, after the decision (added ones are not ready yet)."""
    requests: int
    """Requests arriving in [t_s, t_s + interval_s)."""
    ttft_ms: float | None
    """Mean predicted TTFT of those requests (None: none, or no ready replica)."""
    tpot_ms: float | None
    attainment: float | None
    """Fraction of those requests predicted to meet both objectives."""
    reasons: list[str]


@dataclass(frozen=True)
class ReplaySummary:
    requests: int
    duration_s: float
    attainment: float
    """Fraction of requests predicted to meet both TTFT and TPOT."""
    ttft_attainment: float
    tpot_attainment: float
    gpu_hours: dict[str, float]
    """Per accelerator type, counted from when each replica was requested."""
    cost: float
    """gpu_hours priced at the policy's gpu_cost_per_hour."""
    peak_replicas: dict[str, int]
    scale_events: dict[str, dict[str, int]]
    """Per pool, how many decisions grew ("up") or shrank ("down") it."""


@dataclass(frozen=True)
class ReplayResult:
    timeline: list[IntervalRow]
    summary: ReplaySummary

    def to_dict(self) -> dict:
        return {"summary": asdict(self.summary), "timeline": [asdict(row) for row in self.timeline]}


@dataclass
class _Fleet:
    """One pool's replicas: the target and when those still starting become ready."""

    wanted: int
    starting_until_s: list[float] = field(default_factory=list)

    def ready(self, t_s: float) -> int:
        return self.wanted - sum(1 for r in self.starting_until_s if r > t_s)

    def resize(self, replicas: int, t_s: float, startup_s: float) -> None:
        self.starting_until_s = [r for r in self.starting_until_s if r > t_s]
        if replicas > self.wanted:
            self.starting_until_s += [t_s + startup_s] * (replicas - self.wanted)
        else:
            cancelled = min(len(self.starting_until_s), self.wanted - replicas)
            del self.starting_until_s[len(self.starting_until_s) - cancelled:]  # the latest requested first
        self.wanted = replicas


@dataclass
class _Pools:
    """The fluid state of both pools between events (see the module docstring)."""

    prefill_profile: LatencyProfile
    decode_profile: LatencyProfile
    fleets: dict[str, _Fleet]
    backlog_tokens: float = 0.0
    at_s: float = 0.0
    decoding: list[tuple[float, float]] = field(default_factory=list)
    """Heap of (end_s, context_tokens) of the sequences holding a decode slot."""
    context_tokens: float = 0.0

    def advance(self, to_s: float) -> None:
        """Drain the prefill backlog up to `to_s`, piecewise between replicas becoming ready, and
        free the decode slots whose sequences ended."""
        per_replica_tps = 1000.0 / self.prefill_profile.prefill_ms_per_token
        fleet = self.fleets["prefill"]
        for until_s in sorted({r for r in fleet.starting_until_s if self.at_s < r < to_s} | {to_s}):
            self.backlog_tokens = max(0.0, self.backlog_tokens - fleet.ready(self.at_s) * per_replica_tps * (
                until_s - self.at_s))
            self.at_s = until_s
        while self.decoding and self.decoding[0][0] <= to_s:
            self.context_tokens -= heapq.heappop(self.decoding)[1]

    def admit(self, r: TraceRequest) -> tuple[float, float | None]:
        """Predicted (TTFT ms, TPOT ms or None for one token) of a request arriving now."""
        prefill_replicas = self.fleets["prefill"].ready(r.arrival_s)
        ttft_ms = (self.prefill_profile.prefill_ms(r.prompt_tokens, int(self.backlog_tokens / prefill_replicas))
                   if prefill_replicas else math.inf)
        self.backlog_tokens += r.prompt_tokens
        if r.output_tokens == 1:
            return ttft_ms, None
        decode_replicas = self.fleets["decode"].ready(r.arrival_s)
        if not decode_replicas:
            return ttft_ms, math.inf
        context = r.prompt_tokens + r.output_tokens / 2
        batch = math.ceil((len(self.decoding) + 1) / decode_replicas)
        tpot_ms = self.decode_profile.step_ms(batch, int((self.context_tokens + context) / decode_replicas))
        heapq.heappush(self.decoding, (r.arrival_s + (r.output_tokens - 1) * tpot_ms / 1000.0, context))
        self.context_tokens += context
        return ttft_ms, tpot_ms


def _mean_finite(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


@dataclass(frozen=True)
class _Arrivals:
    """The trace indexed for window sums."""

    arrival_s: list[float]
    cum_prompt_tokens: np.ndarray
    cum_output_tokens: np.ndarray

    @classmethod
    def of(cls, trace: list[TraceRequest]) -> "_Arrivals":
        return cls([r.arrival_s for r in trace], np.cumsum([0] + [r.prompt_tokens for r in trace]),
                   np.cumsum([0] + [r.output_tokens for r in trace]))

    def between(self, from_s: float, to_s: float) -> range:
        """Indices of the requests arriving in [from_s, to_s)."""
        return range(bisect.bisect_left(self.arrival_s, from_s), bisect.bisect_left(self.arrival_s, to_s))

    def rates(self, window: range, span_s: float) -> tuple[float, float, float]:
        """(requests, prompt tokens, output tokens) per second over `window`, `span_s` long."""
        if span_s <= 0:
            return 0.0, 0.0, 0.0
        lo, hi = window.start, window.stop
        return (len(window) / span_s, float(self.cum_prompt_tokens[hi] - self.cum_prompt_tokens[lo]) / span_s,
                float(self.cum_output_tokens[hi] - self.cum_output_tokens[lo]) / span_s)


def _measured_ms(predicted_ms: Sequence[float | None], window: range, noise_factor: float) -> float | None:
    mean = _mean_finite(predicted_ms[window.start:window.stop])
    return None if mean is None else mean * noise_factor


def replay(trace: list[TraceRequest], policy: AutoscalingPolicy, startup_s: float = 60.0,
           initial_replicas: dict[str, int] | None = None, noise: float | None = None, seed: int = 0
           ) -> ReplayResult:
    """Replay `trace` (sorted by arrival) under `policy`; `initial_replicas` default to the
    pools' min_replicas, ready from the start."""
    pools = policy.pools()
    start = initial_replicas or {name: pool.min_replicas for name, pool in pools.items()}
    if not trace:
        raise ValueError("the trace holds no requests")
    if startup_s < 0 or (noise is not None and noise < 0) or min(start[name] for name in POOLS) < 0:
        raise ValueError(f"startup_s, noise and initial replicas must be >= 0, got {startup_s}, {noise}, {start}")
    state = _Pools(policy.prefill.profile, policy.decode.profile, {name: _Fleet(start[name]) for name in POOLS})
    rng = np.random.default_rng(seed)
    dt = policy.interval_s
    intervals = math.floor(trace[-1].arrival_s / dt) + 1
    arrivals = _Arrivals.of(trace)
    ttft = [math.inf] * len(trace)
    tpot: list[float | None] = [None] * len(trace)
    met = [False] * len(trace)
    memory: Memory | None = None
    timeline: list[IntervalRow] = []
    gpu_seconds: dict[str, float] = {}
    events = {name: {"up": 0, "down": 0} for name in POOLS}
    for k in range(intervals):
        t_s = k * dt
        state.advance(t_s)
        window = arrivals.between(t_s - policy.window_s, t_s)
        rps, prompt_tps, output_tps = arrivals.rates(window, min(policy.window_s, t_s))
        noise_factor = {name: math.exp(rng.normal(0.0, noise)) if noise else 1.0 for name in POOLS}
        signals = Signals(
            now_s=t_s, arrival_rps=rps, prompt_tokens_per_s=prompt_tps, output_tokens_per_s=output_tps,
            prefill=PoolSignals(state.fleets["prefill"].wanted, state.fleets["prefill"].ready(t_s),
                                queued_prefill_tokens=state.backlog_tokens,
                                measured_ms=_measured_ms(ttft, window, noise_factor["prefill"])),
            decode=PoolSignals(state.fleets["decode"].wanted, state.fleets["decode"].ready(t_s),
                               running_seqs=float(len(state.decoding)),
                               measured_ms=_measured_ms(tpot, window, noise_factor["decode"])))
        sizes = desired_replicas(signals, policy, memory)
        memory = sizes.memory
        for name, replicas in sizes.replicas().items():
            fleet = state.fleets[name]
            if replicas != fleet.wanted:
                events[name]["up" if replicas > fleet.wanted else "down"] += 1
            fleet.resize(replicas, t_s, startup_s)
            gpu_type = pools[name].accelerator_type
            gpu_seconds[gpu_type] = gpu_seconds.get(gpu_type, 0.0) + replicas * pools[name].gpus_per_replica * dt
        arriving = arrivals.between(t_s, (k + 1) * dt)
        for i in arriving:
            state.advance(trace[i].arrival_s)
            ttft[i], tpot[i] = state.admit(trace[i])
            met[i] = ttft[i] <= policy.prefill.ttft_ms and (tpot[i] is None or tpot[i] <= policy.decode.tpot_ms)
        part = slice(arriving.start, arriving.stop)
        timeline.append(IntervalRow(
            t_s=t_s, arrival_rps=rps, prompt_tokens_per_s=prompt_tps, output_tokens_per_s=output_tps,
            wanted=sizes.replicas(), ready={name: state.fleets[name].ready(t_s) for name in POOLS},
            requests=len(arriving), ttft_ms=_mean_finite(ttft[part]), tpot_ms=_mean_finite(tpot[part]),
            attainment=sum(met[part]) / len(arriving) if arriving else None, reasons=sizes.reasons()))
    gpu_hours = {gpu_type: s / 3600.0 for gpu_type, s in gpu_seconds.items()}
    n = len(trace)
    summary = ReplaySummary(
        requests=n, duration_s=intervals * dt, attainment=sum(met) / n,
        ttft_attainment=sum(t <= policy.prefill.ttft_ms for t in ttft) / n,
        tpot_attainment=sum(t is None or t <= policy.decode.tpot_ms for t in tpot) / n,
        gpu_hours=gpu_hours, cost=sum(h * policy.gpu_cost_per_hour.get(g, 0.0) for g, h in gpu_hours.items()),
        peak_replicas={name: max(row.wanted[name] for row in timeline) for name in POOLS}, scale_events=events)
    return ReplayResult(timeline, summary)
