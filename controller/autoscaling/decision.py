"""One decision sizing the prefill and decode pools together: `desired_replicas`.

Each pool's need is its demand divided by what one replica serves at the pool's objective
(from the latency profile, corrected by measured/predicted latency), at the policy's target
utilization. Then, per pool: hysteresis (shrink only with `downscale_tolerance` to spare),
delays (a need must last `upscale_delay_s` / `downscale_delay_s`, and the size it moves to
is the one needed throughout), step limits and bounds. Last, both pools are cut to the GPU
budget where that loses the least predicted goodput. Pure: the caller passes the memory the
previous decision returned, and does every I/O (signals in, replicas out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pdserve.config.autoscaling_policy import AutoscalingPolicy, DecodeScaling, PoolScaling, PrefillScaling
from pdserve.config.routing import LatencyProfile

CORRECTION_LIMIT = 4.0
"""measured/predicted latency is clipped to [1/limit, limit]: one bad window cannot size a pool 10x."""


@dataclass(frozen=True)
class PoolSignals:
    """One pool as observed over the policy's window."""

    replicas: int
    """Replicas the pool targets now (the size the decision moves from), started or not."""
    ready_replicas: int | None = None
    """Replicas serving now (None: all of `replicas`). The measured latency comes from these
    alone, so the prediction it is compared with spreads the load over these alone."""
    queued_prefill_tokens: float = 0.0
    """Prompt tokens accepted by the pool's replicas and not yet prefilled (sum)."""
    running_seqs: float = 0.0
    """Sequences the pool's replicas are decoding (sum)."""
    kv_usage: float = 0.0
    """Fraction of the pool's KV cache blocks in use."""
    measured_ms: float | None = None
    """Recent TTFT (prefill) or TPOT (decode) of its requests; None when none finished."""


@dataclass(frozen=True)
class Signals:
    now_s: float
    arrival_rps: float
    """Requests per second arriving."""
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    prefill: PoolSignals
    decode: PoolSignals

    def mean_prompt_tokens(self) -> float:
        return self.prompt_tokens_per_s / self.arrival_rps if self.arrival_rps > 0 else 0.0

    def mean_output_tokens(self) -> float:
        return self.output_tokens_per_s / self.arrival_rps if self.arrival_rps > 0 else 0.0


@dataclass(frozen=True)
class PoolMemory:
    """What a pool's next decision must remember: the need pending and since when."""

    direction: int = 0
    """+1: more replicas wanted, -1: fewer, 0: none pending."""
    since_s: float = 0.0
    bound: int = 0
    """The size the pending need has asked for throughout: the smallest asked while growing,
    the largest while shrinking."""


@dataclass(frozen=True)
class Memory:
    prefill: PoolMemory = field(default_factory=PoolMemory)
    decode: PoolMemory = field(default_factory=PoolMemory)


@dataclass(frozen=True)
class PoolDecision:
    replicas: int
    """The size to run."""
    current: int
    needed: int
    """The size demand asks for now, before delays, steps and the budget."""
    demand: float
    """prefill: prompt tokens/s to serve; decode: sequences to run at once."""
    capacity_per_replica: float
    """The same unit, for one replica at the objective and target utilization."""
    correction: float
    """measured/predicted latency applied to the profile."""
    serves_rps: float
    """Requests per second the chosen size serves at its objective (goodput bound)."""
    reason: str


@dataclass(frozen=True)
class PoolSizes:
    prefill: PoolDecision
    decode: PoolDecision
    gpus: float
    cost_per_hour: float
    memory: Memory

    def replicas(self) -> dict[str, int]:
        return {"prefill": self.prefill.replicas, "decode": self.decode.replicas}

    def reasons(self) -> list[str]:
        return [f"prefill: {self.prefill.reason}", f"decode: {self.decode.reason}"]


@dataclass(frozen=True)
class _Need:
    demand: float
    capacity: float
    correction: float
    serves_rps_per_replica: float
    needed: int | None
    """None: the objective cannot be met at any size, so demand gives no size."""
    why: str


def _ratio(measured_ms: float | None, predicted_ms: float) -> float:
    if not measured_ms or predicted_ms <= 0:
        return 1.0
    return min(CORRECTION_LIMIT, max(1.0 / CORRECTION_LIMIT, measured_ms / predicted_ms))


def _size(demand: float, per_replica: float, current: int, tolerance: float) -> int:
    """Replicas for `demand`; below `current` only with `tolerance` of each replica to spare."""
    grow = math.ceil(demand / per_replica - 1e-9)
    if grow >= current:
        return grow
    return min(current, math.ceil(demand / (per_replica * (1 - tolerance)) - 1e-9))


def prefill_need(s: Signals, policy: AutoscalingPolicy) -> _Need:
    """A prefill replica meets TTFT T when a request waits at most for the batch in flight and
    then its own: 2 x (base + per_token x tokens arriving in T/2) <= T, so one replica takes
    (T/2 - base) / (per_token x T/2) prompt tokens per ms."""
    p: PrefillScaling = policy.prefill
    sig = s.prefill
    n = max(1, sig.replicas if sig.ready_replicas is None else sig.ready_replicas)
    prompt = s.mean_prompt_tokens()
    predicted = p.profile.prefill_ms(int(prompt), int(sig.queued_prefill_tokens / n))
    fix = _ratio(sig.measured_ms, predicted) if "ttft_ms" in p.signals else 1.0
    base, per_token, half = p.profile.prefill_base_ms * fix, p.profile.prefill_ms_per_token * fix, p.ttft_ms / 2
    demand = s.prompt_tokens_per_s if "prompt_tokens_per_s" in p.signals else 0.0
    if "queued_prefill_tokens" in p.signals:
        demand += sig.queued_prefill_tokens / policy.backlog_drain_s
    if half <= base:
        return _Need(demand, 0.0, fix, 0.0, None,
                     f"ttft {p.ttft_ms:.0f} ms is unreachable: a lone prompt's fixed cost is {base:.0f} ms (x{fix:.2f})")
    capacity = 1000.0 * (half - base) / (per_token * half) * p.target_utilization
    needed = _size(demand, capacity, sig.replicas, p.downscale_tolerance)
    rps = capacity / prompt if prompt > 0 else math.inf
    return _Need(demand, capacity, fix, rps, needed,
                 f"{demand:.0f} prompt tok/s / {capacity:.0f} per replica at ttft {p.ttft_ms:.0f} ms"
                 f" (x{fix:.2f} measured/predicted) = {needed}")


def decode_need(s: Signals, policy: AutoscalingPolicy) -> _Need:
    """A decode replica meets TPOT T while its step, base + per_seq x b + per_1k x b x context,
    stays under T; a sequence at the objective emits 1000/T tokens/s, so the output rate asks
    for rate x T/1000 sequences at once (Little's law)."""
    d: DecodeScaling = policy.decode
    sig = s.decode
    n = max(1, sig.replicas if sig.ready_replicas is None else sig.ready_replicas)
    context = s.mean_prompt_tokens() + s.mean_output_tokens() / 2
    prof: LatencyProfile = d.profile
    per_replica_seqs = sig.running_seqs / n
    predicted = prof.step_ms(max(1, round(per_replica_seqs)), int(per_replica_seqs * context))
    fix = _ratio(sig.measured_ms, predicted) if "tpot_ms" in d.signals else 1.0
    per_seq = (prof.decode_ms_per_seq + prof.decode_ms_per_1k_context_tokens * context / 1000.0) * fix
    room = d.tpot_ms - prof.decode_base_ms * fix
    seqs = []
    if "output_tokens_per_s" in d.signals:
        seqs.append(s.output_tokens_per_s * d.tpot_ms / 1000.0)
    if "running_seqs" in d.signals:
        seqs.append(sig.running_seqs)
    demand = max(seqs, default=0.0)
    if room < per_seq:
        return _Need(demand, 0.0, fix, 0.0, None,
                     f"tpot {d.tpot_ms:.0f} ms is unreachable: one sequence's step takes {d.tpot_ms - room + per_seq:.0f} ms"
                     f" (x{fix:.2f})")
    capacity = (room / per_seq if per_seq > 0 else math.inf) * d.target_utilization
    needed = _size(demand, capacity, sig.replicas, d.downscale_tolerance)
    why = f"{demand:.1f} seqs / {capacity:.1f} per replica at tpot {d.tpot_ms:.0f} ms (x{fix:.2f} measured/predicted)"
    if "kv_usage" in d.signals and sig.kv_usage > 0:
        by_kv = _size(n * sig.kv_usage, d.kv_usage_target, sig.replicas, d.downscale_tolerance)
        why += f", KV {sig.kv_usage:.0%} used of {d.kv_usage_target:.0%} target x {n} serving = {by_kv}"
        needed = max(needed, by_kv)
    output = s.mean_output_tokens()
    rps = capacity * 1000.0 / (d.tpot_ms * output) if output > 0 else math.inf
    return _Need(demand, capacity, fix, rps, needed, f"{why} -> {needed}")


def _pace(pool: PoolScaling, current: int, needed: int | None, mem: PoolMemory, now_s: float
          ) -> tuple[int, PoolMemory, str]:
    """Apply bounds, delays and the step limit to a pool's need."""
    lo, hi = pool.min_replicas, pool.max_replicas
    if current < lo or current > hi:
        size = min(hi, max(lo, current))
        return size, PoolMemory(), f"{current} is outside [{lo}, {hi}]: {size}"
    if needed is None:
        return current, PoolMemory(), "kept"
    target = min(hi, max(lo, needed))
    direction = (target > current) - (target < current)
    if direction == 0:
        return current, PoolMemory(), "steady"
    if mem.direction != direction:
        mem = PoolMemory(direction, now_s, target)
    else:
        mem = replace(mem, bound=min(mem.bound, target) if direction > 0 else max(mem.bound, target))
    delay = pool.upscale_delay_s if direction > 0 else pool.downscale_delay_s
    waited = now_s - mem.since_s
    if waited < delay:
        return current, mem, f"{'up' if direction > 0 else 'down'} to {target} pending {waited:.0f}/{delay:.0f} s"
    size = current + direction * min(pool.max_step, abs(mem.bound - current))
    return size, PoolMemory(direction, now_s, target), f"{current} -> {size} (needed {mem.bound} for {waited:.0f} s)"


def _goodput_rps(arrival_rps: float, serves: dict[str, float]) -> float:
    return min([arrival_rps, *serves.values()])


def _fit_budget(policy: AutoscalingPolicy, sizes: dict[str, int], per_replica_rps: dict[str, float],
                arrival_rps: float) -> tuple[dict[str, int], list[str]]:
    """Remove replicas one at a time until the budget holds, each time where predicted goodput
    drops the least per GPU freed, and among equals where the GPUs cost the most."""
    pools, cuts = policy.pools(), []
    budget = policy.gpu_budget
    while budget is not None and sum(sizes[p] * pools[p].gpus_per_replica for p in sizes) > budget + 1e-9:
        options = []
        before = _goodput_rps(arrival_rps, {p: sizes[p] * per_replica_rps[p] for p in sizes})
        for name, pool in pools.items():
            if sizes[name] <= pool.min_replicas or pool.gpus_per_replica == 0:
                continue
            after = _goodput_rps(arrival_rps, {p: (sizes[p] - (p == name)) * per_replica_rps[p] for p in sizes})
            price = pool.gpus_per_replica * policy.gpu_cost_per_hour.get(pool.accelerator_type, 0.0)
            options.append(((before - after) / pool.gpus_per_replica, -price, name, before - after))
        if not options:
            break  # unreachable: the policy's validator keeps the minimums within the budget
        loss_per_gpu, _, name, loss = min(options)
        sizes = {**sizes, name: sizes[name] - 1}
        cuts.append(f"{name} -1 for the GPU budget (-{loss:.2f} req/s predicted goodput)")
    return sizes, cuts


def desired_replicas(signals: Signals, policy: AutoscalingPolicy, memory: Memory | None = None) -> PoolSizes:
    """Sizes for both pools, with the reasons and the memory to pass to the next call."""
    memory = memory or Memory()
    needs = {"prefill": prefill_need(signals, policy), "decode": decode_need(signals, policy)}
    current = {"prefill": signals.prefill.replicas, "decode": signals.decode.replicas}
    sizes, mems, paced = {}, {}, {}
    for name, pool in policy.pools().items():
        sizes[name], mems[name], paced[name] = _pace(pool, current[name], needs[name].needed, getattr(memory, name),
                                                     signals.now_s)
    per_rps = {name: need.serves_rps_per_replica for name, need in needs.items()}
    sizes, cuts = _fit_budget(policy, sizes, per_rps, signals.arrival_rps)
    decisions = {}
    for name, need in needs.items():
        why = f"{need.why}; {paced[name]}"
        why += "".join(f"; {c}" for c in cuts if c.startswith(name))
        decisions[name] = PoolDecision(
            replicas=sizes[name], current=current[name], needed=need.needed if need.needed is not None else current[name],
            demand=need.demand, capacity_per_replica=need.capacity, correction=need.correction,
            serves_rps=sizes[name] * need.serves_rps_per_replica, reason=why)
    gpus = sum(sizes[p] * pool.gpus_per_replica for p, pool in policy.pools().items())
    return PoolSizes(decisions["prefill"], decisions["decode"], gpus, policy.cost_per_hour(sizes),
                     Memory(mems["prefill"], mems["decode"]))
