"""SLO-aware routing and early admission, as pure functions of the pools' views.

For a request of P prompt tokens with objectives (TTFT, TPOT):
- each decode instance's next step time with the request added is predicted; it may take
  the request only if that step keeps every request running there (and this one) within
  its TPOT objective, it has a free slot and KV room for the prompt plus reserved output;
- TTFT through a decode instance d is the fastest way to get its prompt prefilled: on a
  prefill instance (its queue, then the prompt; it samples the first token, and the KV
  transfer, same-node or not, picks the prefill instance whose KV reaches d first), or,
  for short prompts, on d itself (conditional disaggregation) when that one longer step
  stays within the TPOT objectives of the requests running on d, then d's first step;
- the pair with the lowest predicted TTFT among those meeting both objectives wins. When
  none meets them the request is refused at once (or served best-effort, by policy), and
  a lower priority needs more predicted room, so it is refused first.

Adaptive mode passes one view as both pools: every instance prefills and decodes, with chunked
prefill. A prompt is prefilled where it decodes (any length), or on another instance with its KV
moved; either way its chunks stretch each step of the requests decoding on the instance that
prefills it by one chunk's compute, which must keep them within their TPOT objectives (each step,
or each answer's mean over the steps it has left). So under TPOT-tight load an instance with
decodes running prefills little and the pool splits into prefilling and decoding instances by
itself; under loose objectives it serves as colocated. An answer whose KV moves onto an instance
that has prompts queued starts after them, so it goes there only if its TPOT objective absorbs that
wait, and only when that is soonest.

Served best effort, a request no pair serves within its objectives (or, adaptive, whose prompt no
instance can prefill sparing its decoding answers) is held at its ingress while its TTFT objective
leaves time for its first token, as it would wait in a prefill instance's queue, and served then;
past that, held on for a while yet if served it would push the requests decoding where it goes
past their TPOT objectives.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pdserve.config.routing import RoutingConfig
from pdserve.controller.adaptive_pool import (
    behind_queue,
    chunked_prefill_ms,
    kv_arrival_elsewhere,
    prefill_fits,
    shuts_last_clear,
    stall_note,
)
from pdserve.controller.decision import Decision, Outcome, RouteRequest, Target
from pdserve.controller.latency_model import transfer_ms
from pdserve.controller.pool_view import PoolView

DISAGGREGATED_LOCAL_MAX_TOKENS = 64
"""`local_prefill_max_tokens` unset, in disaggregated mode: a decode engine prefills a prompt in
one step, stalling every request decoding there for all of it."""


def priority_headroom(priority: int, cfg: RoutingConfig) -> float:
    """The share of its objectives a request of this priority must be predicted within."""
    return max(0.05, 1.0 - cfg.priority_margin * priority)


def choose_slo(req: RouteRequest, prefill: PoolView | None, decode: PoolView, live_after_s: float,
               cfg: RoutingConfig, kv_bytes_per_token: int, best_effort: bool = False,
               spare_decoding: bool = True, prefill_cached: np.ndarray | None = None,
               decode_cached: np.ndarray | None = None, hold: bool = False) -> Decision:
    """The pair for `req`; `prefill` None means colocated (every instance prefills its own),
    `prefill` the very view `decode` is means adaptive (every instance does both).
    Instances that last reported before `live_after_s` are out of routing. `spare_decoding`
    False (adaptive, best effort when no instance can prefill without it): an instance may
    prefill whatever that does to the answers decoding there. `prefill_cached`/`decode_cached`:
    per instance of each view, the prompt's leading tokens its prefix cache holds, which a
    prefill there does not compute (None: nothing cached). `hold`: a request that would be served
    best effort (objectives not met, or decoding answers not spared) is held instead while its TTFT
    objective allows (`hold_recheck_ms`).

    The common case (some pair meets the objectives) runs as few array operations as it
    can; why a request cannot be served is worked out only when it cannot."""
    n, slo = req.prompt_tokens, req.slo
    adaptive = prefill is decode
    d_new, p_new = _uncached(n, decode_cached), _uncached(n, prefill_cached)
    step = decode.step_base_ms + decode.step_ms_per_token * n  # the next decode step with the request added
    headroom = priority_headroom(slo.priority, cfg)
    ttft_limit = slo.ttft_ms * headroom - req.held_ms
    roomy = (decode.last_seen_s >= live_after_s) & (
        decode.open_kv_tokens >= n + min(req.max_tokens, cfg.kv_reserve_tokens))
    meets = roomy & (step <= decode.tpot_floor_ms) & (step <= slo.tpot_ms * headroom)

    cap = cfg.local_prefill_max_tokens if cfg.local_prefill_max_tokens is not None else (
        None if adaptive else DISAGGREGATED_LOCAL_MAX_TOKENS)
    # The cap bounds what a local prefill computes: a later turn whose history the instance holds
    # may prefill just its new message there.
    local_ok = True if prefill is None or cap is None else np.asarray(d_new) <= cap  # one or per instance
    local_allowed = bool(np.any(local_ok))
    local_ttft = None
    # A prompt prefilled where answers are decoding waits for the step in flight; on an idle
    # instance its prefill step samples the first token at once.
    busy = np.isfinite(decode.tpot_floor_ms)  # answers decoding there
    in_flight = np.where(busy, step, 0.0)
    if local_allowed and adaptive:
        fits = prefill_fits(d_new, decode) if spare_decoding else True
        local_ttft = np.where(local_ok & fits, chunked_prefill_ms(d_new, decode) + in_flight, np.inf)
    elif local_allowed:  # prefilling here stalls the running requests for one step: keep it within their TPOT
        stall = decode.prefill_base_ms + decode.prefill_ms_per_token * d_new
        spared = stall <= decode.tpot_floor_ms if prefill is not None else True
        local_ttft = np.where(local_ok & spared, in_flight + stall, np.inf)
    remote_ttft, remote_going, pick_prefill = None, None, None
    if prefill is not None:
        if adaptive:
            first, arrival, pick_prefill = kv_arrival_elsewhere(d_new, p_new, prefill, live_after_s, cfg,
                                                                kv_bytes_per_token, spare_decoding)
        else:
            first, arrival, pick_prefill = _kv_arrival(d_new, p_new, prefill, live_after_s, decode, cfg,
                                                       kv_bytes_per_token)
        remote_ttft = first + np.zeros_like(step)  # per decode instance, whether `first` is one figure or not
        remote_going = arrival + step  # the decode instance has the request running: the answer goes on at its pace
        if adaptive:
            # Its own answer, spared even in best effort (which spares no neighbour): moved behind a
            # long queue it would miss its TPOT by seconds however soon its first token.
            absorbs, wait = behind_queue(req, decode, arrival, step, headroom, cfg)
            remote_ttft = np.where(absorbs, remote_ttft, np.inf)
            remote_going = np.where(np.isfinite(remote_ttft), remote_going + wait, np.inf)
    if local_ttft is None:
        ttft, local = remote_ttft, np.zeros(len(decode), bool)
    elif remote_ttft is None:
        ttft, local = local_ttft, np.ones(len(decode), bool)
    else:  # a short prompt prefilled where it decodes skips the transfer and the hop to a prefill instance
        local = local_ttft + (step - in_flight) <= remote_going  # when each answer's second token comes
        ttft = np.where(local, local_ttft, remote_ttft)
    both_ways = local_ttft is not None and remote_going is not None
    meets &= ttft <= ttft_limit

    note = "" if spare_decoding else "best effort, decoding answers not spared: "
    # Soonest first token. On a tie an answer goes where answers already decode and no prompt is
    # queued, its own prefilled elsewhere (roles settle with the load), else stays whole on one
    # instance: a split onto an idle instance would move KV and take two engines for nothing, and
    # one onto an instance that prefills too would add the KV's wait to its answer for nothing.
    preference = np.where(local, 1, np.where(busy & (decode.queued_stall_ms <= 0), 2, 0))
    # Before the soonest: an answer that would shut the pool's last instance free of answers to prompts
    # like its own goes where answers already decode, when one meets its objectives.
    shuts = shuts_last_clear(req, decode, busy, step, headroom, cfg, live_after_s) if adaptive else False
    ranked = np.where(meets, ttft, np.inf)
    d = int(np.lexsort((-preference, ranked, np.where(meets, shuts, 2)))[0]) if len(decode) else 0
    if not len(decode) or not meets[d]:
        refusal = _why_not(req, prefill, decode, live_after_s, roomy, local_allowed, cfg)
        if refusal is None:
            d = int(np.where(roomy, ttft, np.inf).argmin())
            if best_effort and adaptive and spare_decoding and not np.isfinite(ttft[d]):
                # Every instance that could prefill it has answers decoding that its chunks would slow
                # past their TPOT: served anyway, where it is soonest (held first, while its TTFT allows).
                return choose_slo(req, prefill, decode, live_after_s, cfg, kv_bytes_per_token, True, False,
                                  prefill_cached, decode_cached, hold)
            if not best_effort or not np.isfinite(ttft[d]):
                return _refused(req, roomy, ttft, step, headroom, _pool_name(prefill, decode), ttft_limit)
            note = "best effort, objectives not met" + ("" if spare_decoding else ", decoding answers not spared") + ": "
        else:
            return refusal
    p = None if local[d] or prefill is None or pick_prefill is None else pick_prefill(d)
    pre = None if p is None else _target(prefill, p)
    dec = _target(decode, d)
    cached = n - (_at(p_new, p) if p is not None else _at(d_new, d))
    held = n - _at(d_new, d) if p is not None else 0
    where = f"prefill {pre.replica_id} (load {pre.load})" if pre else "local prefill"
    where += f", {cached} prompt tokens cached" if cached else ""
    where += f", {held} held by the decode instance are not moved" if held else ""
    reason = (f"{note}{where} -> {dec.replica_id} (load {dec.load}): ttft {ttft[d]:.0f}/{slo.ttft_ms:.0f} ms, "
              f"tpot {step[d]:.0f}/{slo.tpot_ms:.0f} ms")
    if adaptive:
        reason += stall_note(decode, p if p is not None else d, n - cached)
    soonest = int(ranked.argmin()) if len(decode) else d
    if soonest != d and np.isfinite(ranked[d]) and ranked[soonest] < ranked[d]:
        reason += (f"; {decode.replica_ids[soonest]} kept free of answers for prompts like it (ttft "
                   f"{ranked[soonest]:.0f} ms there, where its answer would take none of their chunks)")
    if both_ways and np.isfinite(local_ttft[d]) and np.isfinite(remote_going[d]):
        reason += (f"; second token at {local_ttft[d] + step[d] - in_flight[d]:.0f} ms prefilled here, "
                   f"{remote_going[d]:.0f} ms with the KV moved")
    if hold and note and cfg.hold_recheck_ms > 0:
        why_held = _hold(req, ttft_limit, float(ttft[d]), float(step[d]), cfg,
                         _harms_others(decode, d, p, n - cached, float(step[d]), adaptive))
        if why_held:
            return Decision(Outcome.HELD, reason=f"{why_held}, served now: {reason}", predicted_ttft_ms=float(ttft[d]),
                            predicted_tpot_ms=float(step[d]), retry_after_s=cfg.hold_recheck_ms / 1000.0)
    if req.held_ms:
        reason = f"held {req.held_ms:.0f} ms, {reason}"
    return Decision(Outcome.ROUTED, pre, dec, reason, float(ttft[d]), float(step[d]), cached_tokens=cached,
                    decode_cached_tokens=held)


def _hold(req: RouteRequest, ttft_limit_ms: float, ttft_ms: float, step_ms: float, cfg: RoutingConfig,
          harms_others: bool) -> str:
    """Why a request that would be served best effort is held instead ("": it is served now).
    While its TTFT objective leaves room for one more recheck it waits for what runs to drain, as it
    would in a prefill instance's queue. Past that its own objectives are lost; served now it would
    take down the requests decoding where it goes as well, so, where it would, it waits on, up to
    `late_hold_max_s` past its objective and while its deadline still leaves time for its answer."""
    recheck_ms = cfg.hold_recheck_ms
    limit_ms = min(ttft_limit_ms, req.lifetime_s * 1000.0)
    if recheck_ms <= limit_ms - ttft_ms:
        return f"held ({req.held_ms:.0f} ms so far, {limit_ms:.0f} ms of its ttft objective left)"
    if not harms_others:
        return ""
    answer_ms = step_ms * req.max_tokens
    late_ms = min(ttft_limit_ms + cfg.late_hold_max_s * 1000.0, req.lifetime_s * 1000.0 - answer_ms)
    if recheck_ms <= late_ms - ttft_ms:
        return (f"held past its ttft objective ({req.held_ms:.0f} ms so far, {late_ms:.0f} ms of its late hold "
                f"left), as it would slow the requests decoding where it goes past their tpot")
    return ""


def _harms_others(decode: PoolView, d: int, p: int | None, tokens: int, step_ms: float, adaptive: bool) -> bool:
    """Whether a route pushes the requests decoding where it goes past their TPOT objectives: its
    step in d's batch, or, adaptive, its `tokens` of prompt chunks where it is prefilled."""
    if step_ms > decode.tpot_floor_ms[d]:
        return True
    return adaptive and not bool(prefill_fits(tokens, decode)[p if p is not None else d])


def _why_not(req: RouteRequest, prefill: PoolView | None, decode: PoolView, live_after_s: float,
             roomy: np.ndarray, local_allowed: bool, cfg: RoutingConfig) -> Decision | None:
    """Why no pair meets the objectives when the reason is a pool's state (nothing live,
    everything full, no KV room); None when it is the predicted latencies."""
    pool = _pool_name(prefill, decode)
    live = decode.last_seen_s >= live_after_s
    if not live.any():
        return Decision(Outcome.UNAVAILABLE, reason=f"no live {pool} instance")
    if not (live & decode.open).any():
        return Decision(Outcome.OVERLOADED, reason=f"every {pool} instance is full")
    if not roomy.any():
        need = req.prompt_tokens + min(req.max_tokens, cfg.kv_reserve_tokens)
        most = float(decode.free_kv_tokens[live & decode.open].max())
        return Decision(Outcome.OVERLOADED, reason=f"no {pool} instance has KV room for {need} tokens "
                        f"(most free: {most:.0f})")
    if prefill is not None and prefill is not decode and not local_allowed:
        p_live = prefill.last_seen_s >= live_after_s
        if not p_live.any():
            return Decision(Outcome.UNAVAILABLE, reason="no live prefill instance")
        if not (p_live & prefill.open).any():
            return Decision(Outcome.OVERLOADED, reason="every prefill instance is full")
    return None


def _uncached(n: int, cached: np.ndarray | None) -> np.ndarray | int:
    """The prompt tokens a prefill computes on each instance: its last token at least, as vLLM
    always computes it (the first output needs its logits)."""
    return n if cached is None else n - np.minimum(cached, n - 1)


def _at(per_instance: np.ndarray | int, i: int) -> int:
    return int(per_instance[i]) if isinstance(per_instance, np.ndarray) else per_instance


def _kv_arrival(moved: np.ndarray | int, new: np.ndarray | int, prefill: PoolView, live_after_s: float,
                decode: PoolView, cfg: RoutingConfig, kv_bytes_per_token: int
                ) -> tuple[np.ndarray | float, np.ndarray | float, Callable[[int], int]]:
    """For each decode instance, the prefill instance whose KV reaches it first: when that one
    samples the first token (computing `new` of the prompt's tokens, per prefill instance), when
    the KV arrives (`moved` tokens, per decode instance: what its prefix cache lacks; both inf
    when no prefill instance is open), and which it is."""
    if not len(prefill):
        return np.inf, np.inf, lambda d: 0
    ready = prefill.open_prefill_base_ms + prefill.prefill_ms_per_token * new
    ready[prefill.last_seen_s < live_after_s] = np.inf
    best = int(ready.argmin())
    cross = float(ready[best]) + transfer_ms(moved, kv_bytes_per_token, cfg.inter_node_kv_gbps, cfg.kv_transfer_setup_ms)
    if cfg.inter_node_kv_gbps >= cfg.intra_node_kv_gbps:  # a transfer costs the same anywhere
        return float(ready[best]), cross, lambda d: best
    # The fastest prefill instance of each node (rows are grouped by node).
    starts, nodes = prefill.node_starts, prefill.group_nodes
    by_node = np.full(max(prefill.max_node, decode.max_node) + 1, np.inf)
    by_node[nodes] = np.minimum.reduceat(ready, starts)
    same_ready = by_node[decode.node]
    same = same_ready + transfer_ms(moved, kv_bytes_per_token, cfg.intra_node_kv_gbps, cfg.kv_transfer_setup_ms)
    use_same = same < cross

    def pick(d: int) -> int:
        if not use_same[d]:
            return best
        k = int(np.searchsorted(nodes, decode.node[d]))
        end = starts[k + 1] if k + 1 < len(starts) else len(ready)
        return int(starts[k] + np.argmin(ready[starts[k]:end]))

    return np.where(use_same, same_ready, float(ready[best])), np.minimum(same, cross), pick














def _pool_name(prefill: PoolView | None, decode: PoolView) -> str:
    return "colocated" if prefill is None else "adaptive" if prefill is decode else "decode"


def _target(view: PoolView, i: int) -> Target:
    return Target(view.replica_ids[i], view.kv_addrs[i], int(view.load[i]), view.pools[i], int(view.tp_size[i]))


def _refused(req: RouteRequest, roomy: np.ndarray, ttft: np.ndarray, step: np.ndarray, headroom: float,
             pool: str, ttft_limit: float) -> Decision:
    best_ttft = float(np.min(np.where(roomy, ttft, np.inf)))
    best_step = float(np.min(np.where(roomy, step, np.inf)))
    tpot_limit = req.slo.tpot_ms * headroom
    # Roughly when the queues ahead will have drained enough for the TTFT objective.
    retry_after_s = min(30.0, max(1.0, (best_ttft - ttft_limit) / 1000.0))
    return Decision(Outcome.REJECTED, reason=(
        f"no {pool} pair is predicted to meet the objectives at priority {req.slo.priority}: best ttft "
        f"{best_ttft:.0f}/{ttft_limit:.0f} ms, best tpot {best_step:.0f}/{tpot_limit:.0f} ms"),
        predicted_ttft_ms=best_ttft, predicted_tpot_ms=best_step, retry_after_s=retry_after_s)
