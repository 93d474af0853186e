"""Adaptive mode's predictions, where every instance prefills and decodes: a prompt's chunks in the
steps of the answers decoding where it is prefilled, an answer moved behind the prompts queued where
it decodes, and the pool's last instance free of answers, kept for prompts no answer can take."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pdserve.config.routing import RoutingConfig
from pdserve.controller.decision import RouteRequest
from pdserve.controller.latency_model import chunk_of, chunks_of, prefill_stall_ms, transfer_ms
from pdserve.controller.pool_view import PoolView

CLEAR_FOR_PROMPTS = 2
"""Adaptive mode: an answer that could take the chunks of fewer prompts like its own than this beside
it, within its TPOT objective, does not go to the pool's last instance free of answers while another
can decode it: prompts arrive while it decodes (at 0.46 req/s, 4-5 during a summarization answer on
the project's CPU engines), and one that finds every instance shut to it waits or slows answers."""


def chunked_prefill_ms(n: np.ndarray | int, view: PoolView) -> np.ndarray:
    """When each instance would have `n` prompt tokens (per instance) prefilled, behind its queue: chunk
    by chunk, each chunk in a step with the requests decoding there (none: the chunk alone)."""
    chunk = chunk_of(n, view.prefill_chunk_tokens)
    steps = -(-n // chunk)
    decoding = np.isfinite(view.tpot_floor_ms)
    return view.prefill_base_ms + view.prefill_ms_per_token * n + np.where(decoding, steps * view.step_base_ms, 0.0)


def prefill_fits(n: np.ndarray | int, view: PoolView) -> np.ndarray:
    """Whether each instance can prefill `n` prompt tokens (per instance) without pushing the requests decoding
    there past their TPOT objectives: each of their steps carries one chunk meanwhile. It can when
    every such step stays within the tightest objective, or when every answer's objective, a mean
    over its tokens, absorbs the stall of the chunks that ride its steps left on top of what is
    booked there already (a chunk's stall is predicted as a prefill of its length, fixed cost
    included, on the safe side; unchunked, the whole prompt's on every answer)."""
    chunk = chunk_of(n, view.prefill_chunk_tokens)
    each_step = view.step_base_ms + view.prefill_fixed_ms + view.prefill_ms_per_token * chunk <= view.tpot_floor_ms
    stall = prefill_stall_ms(n, view.prefill_chunk_tokens, view.prefill_fixed_ms, view.prefill_ms_per_token)
    absorbed = np.where(view.prefill_chunk_tokens > 0, chunks_of(n, view.prefill_chunk_tokens) <= view.absorbable_chunks,
                        stall <= view.tpot_slack_ms)
    return each_step | absorbed


def shuts_last_clear(req: RouteRequest, view: PoolView, busy: np.ndarray, step: np.ndarray, headroom: float,
                     cfg: RoutingConfig, live_after_s: float) -> np.ndarray:
    """Per instance, whether decoding the request there would leave the pool no live instance free of
    answers while its answer could not take the chunks of `CLEAR_FOR_PROMPTS` prompts like its own
    within its TPOT objective (by `prefill_fits`' two rules, over its own steps). Such a prompt is
    then held or slows answers wherever it goes, where a disaggregated pool's prefill instance would
    just queue it: under long prompts and tight TPOT objectives the pool keeps a prefilling
    instance, and under short prompts or loose objectives, which answers absorb, it serves as
    colocated."""
    clear = ~busy & view.open & (view.last_seen_s >= live_after_s)
    if clear.sum() != 1:
        return np.zeros(len(view), bool)
    n = req.prompt_tokens
    chunk_ms = view.prefill_fixed_ms + view.prefill_ms_per_token * chunk_of(n, view.prefill_chunk_tokens)
    stall = prefill_stall_ms(n, view.prefill_chunk_tokens, view.prefill_fixed_ms, view.prefill_ms_per_token)
    return clear & ~_own_answer_absorbs(req, step, chunk_ms, CLEAR_FOR_PROMPTS * stall, headroom, cfg)


def behind_queue(req: RouteRequest, view: PoolView, arrival: np.ndarray | float, step: np.ndarray, headroom: float,
                 cfg: RoutingConfig) -> tuple[np.ndarray, np.ndarray]:
    """For an answer whose KV moves onto each instance (landing `arrival` ms from now): how long it waits
    there for its first step, and whether its TPOT objective absorbs that wait, by the same two rules
    as `prefill_fits`. A moved answer reaches its engine once its prompt is prefilled elsewhere and
    joins the waiting queue behind the prompts queued there; vLLM admits waiting requests first come
    first served, and each admitted prompt's chunks fill the steps' token budget, so it starts when
    they are prefilled (answers moved onto an engine with a long queue waited 7-19 s on the project's
    CPU engines). The queue drains in about its chunks' compute (the decode part of those steps left
    out)."""
    wait = np.maximum(view.queued_stall_ms - arrival, 0.0)
    return _own_answer_absorbs(req, step, wait, wait, headroom, cfg), wait


def _own_answer_absorbs(req: RouteRequest, step: np.ndarray, step_ms: np.ndarray, total_ms: np.ndarray,
                        headroom: float, cfg: RoutingConfig) -> np.ndarray:
    """Whether the request's own answer, at steps of `step` ms, keeps its TPOT objective with a delay
    of `step_ms` added to one step, or with `total_ms` in all spread over its tokens (its max_tokens,
    at most `tpot_amortize_max_tokens`): `prefill_fits`' two rules, for the answer being routed."""
    limit = req.slo.tpot_ms * headroom
    room = (limit - step) * max(min(req.max_tokens, cfg.tpot_amortize_max_tokens) - 1, 0)
    return (step + step_ms <= limit) | (total_ms <= room)


def stall_note(view: PoolView, i: int, tokens: int) -> str:
    """The chunks' stall on the answers decoding where a prompt is prefilled, against the least room
    those answers have for it, and the chunks they take ("" where none decode)."""
    if not np.isfinite(view.tpot_slack_ms[i]):
        return ""
    stall = prefill_stall_ms(tokens, view.prefill_chunk_tokens[i], view.prefill_fixed_ms[i], view.prefill_ms_per_token[i])
    note = f"; its chunks stall the answers decoding there {float(stall):.0f} ms, room {view.tpot_slack_ms[i]:.0f} ms"
    if view.prefill_chunk_tokens[i] > 0 and np.isfinite(view.absorbable_chunks[i]):
        note += f", {int(chunks_of(tokens, view.prefill_chunk_tokens[i]))} chunks where they take {view.absorbable_chunks[i]:.0f}"
    return note


def kv_arrival_elsewhere(moved: np.ndarray | int, new: np.ndarray | int, view: PoolView, live_after_s: float,
                         cfg: RoutingConfig, kv_bytes_per_token: int, spare_decoding: bool
                         ) -> tuple[np.ndarray | float, np.ndarray | float, Callable[[int], int]]:
    """`slo_router._kv_arrival` within one pool (adaptive): for each instance as the decoding one, the other
    instance whose prefill has the first token, and then the KV there, soonest; an instance
    whose decoding requests a prefill would push past their TPOT prefills nothing (unless
    not `spare_decoding`)."""
    if not len(view):
        return np.inf, np.inf, lambda d: 0
    fits = prefill_fits(new, view) if spare_decoding else True
    ready = np.where(view.open & (view.last_seen_s >= live_after_s) & fits, chunked_prefill_ms(new, view), np.inf)
    rows = np.arange(len(view))
    padded = np.r_[ready, np.inf]  # index len(view): "no other instance"
    top = np.argsort(ready, kind="stable")[:2]
    best, second = int(top[0]), int(top[1]) if len(top) > 1 else len(view)
    cross_pick = np.where(rows == best, second, best)
    cross_ready = padded[cross_pick]
    cross = cross_ready + transfer_ms(moved, kv_bytes_per_token, cfg.inter_node_kv_gbps, cfg.kv_transfer_setup_ms)
    if cfg.inter_node_kv_gbps >= cfg.intra_node_kv_gbps:
        return cross_ready, cross, lambda d: int(cross_pick[d])
    # The two fastest instances of each node (rows are grouped by node): the first that is not d.
    starts = view.node_starts
    sizes = np.diff(np.r_[starts, len(view)])
    group = np.repeat(np.arange(len(starts)), sizes)
    order = np.lexsort((ready, group))
    first = order[starts]
    following = np.where(sizes > 1, order[np.minimum(starts + 1, len(view) - 1)], len(view))
    same_pick = np.where(first[group] == rows, following[group], first[group])
    same_ready = padded[same_pick]
    same = same_ready + transfer_ms(moved, kv_bytes_per_token, cfg.intra_node_kv_gbps, cfg.kv_transfer_setup_ms)
    use_same = same < cross
    pick = np.where(use_same, same_pick, cross_pick)
    return np.where(use_same, same_ready, cross_ready), np.minimum(same, cross), lambda d: int(pick[d])
