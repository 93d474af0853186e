"""Decision latency of the routers with many registered instances.

Builds a registry of `n_instances` (half prefill on two accelerator types, one 3x faster,
half decode; eight instances a node, slow links between nodes so the same-node search
runs), loads them with queued prompts and running sequences drawn from a fixed seed,
then times each router on requests with mixed prompt lengths. The SLO router's time is
the decision alone (what `choose_slo` costs), with a uniform network and with slow links
between nodes (the same-node search); booking a routed request on its instances is timed
apart, since it is not on the decision's path in a controller that books after answering.
Prefix-aware routing is timed with every instance's prefix cache indexed (conversations that
start with one of a few shared system prompts) and requests that share those prompts: the
decision then includes looking the prompt up in both pools.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import psutil

from pdserve.config.routing import CPU_PROFILE, RoutingConfig
from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest
from pdserve.controller.instance import LoadReport
from pdserve.controller.least_load import choose_least_load
from pdserve.controller.prefix_index import GRAIN_TOKENS, CacheEvents, Stored, block_hashes
from pdserve.controller.registry import Registry
from pdserve.controller.slo_router import choose_slo

KV_BYTES_PER_TOKEN = 23_040  # SmolLM2-135M in bfloat16: 2 x 30 layers x 3 KV heads x 64 x 2 bytes
SYSTEM_PROMPTS = 64
"""Shared system prompts of 512 tokens that the indexed conversations and the requests start with."""
CONVERSATION_TOKENS = 1024
"""Tokens of each cached conversation: a system prompt and 512 of its own."""
VOCAB = 49_152


def build_registry(n_instances: int, cfg: RoutingConfig, seed: int) -> Registry:
    rng = np.random.default_rng(seed)
    fast = CPU_PROFILE.model_copy(update={"prefill_ms_per_token": CPU_PROFILE.prefill_ms_per_token / 3})
    reg = Registry({**cfg.profiles, "FAST": fast}, ttl_s=cfg.ttl_s, kv_reserve_tokens=cfg.kv_reserve_tokens)
    for i in range(n_instances):
        pool = "prefill" if i % 2 == 0 else "decode"
        accel = "FAST" if pool == "prefill" and i % 4 == 0 else None
        report = LoadReport(
            f"{pool}-{i}", pool, f"node-{i // 8}", accel, f"10.0.{i // 250}.{i % 250}:7000" if pool == "decode" else "",
            max_ongoing=64, started_at_s=1.0, running=int(rng.integers(0, 32)),
            queued_prefill_tokens=int(rng.integers(0, 4000)) if pool == "prefill" else 0,
            context_tokens=int(rng.integers(0, 20_000)) if pool == "decode" else 0,
            free_kv_blocks=int(rng.integers(100, 4000)), total_kv_blocks=4000, block_size=16)
        reg.report(report, now_s=0.0)
    return reg


def fill_prefix_index(reg: Registry, cached_tokens_per_instance: int, rng: np.random.Generator) -> list[list[int]]:
    """Index conversations in every instance's prefix cache, as its KV cache events would report
    them (one block of `GRAIN_TOKENS` per event hash); returns the shared system prompts."""
    systems = [rng.integers(0, VOCAB, 512).tolist() for _ in range(SYSTEM_PROMPTS)]
    per_block = GRAIN_TOKENS
    for rid, inst in reg.instances.items():
        conversations = cached_tokens_per_instance // CONVERSATION_TOKENS
        events = []
        for c in range(conversations):
            tokens = systems[int(rng.integers(SYSTEM_PROMPTS))] + rng.integers(0, VOCAB, 512).tolist()
            events.append(Stored(None, tuple((rid, c, k) for k in range(len(tokens) // per_block)), tuple(tokens),
                                 per_block))
        reg.report(replace(inst.report, cache=CacheEvents(tuple(events))), 0.0)
    return systems


def _time(decide: Callable[[RouteRequest], Decision], requests: list[RouteRequest]) -> dict:
    for req in requests[:200]:  # warm caches and numpy's dispatch
        decide(req)
    samples_us, routed = [], 0
    for req in requests:
        start = time.perf_counter_ns()
        d = decide(req)
        samples_us.append((time.perf_counter_ns() - start) / 1e3)
        routed += d.outcome is Outcome.ROUTED
    arr = np.array(samples_us)
    return {"decisions": len(requests), "routed": routed, "p50_us": float(np.percentile(arr, 50)),
            "p99_us": float(np.percentile(arr, 99)), "mean_us": float(arr.mean())}


def run(n_instances: int = 1000, n_decisions: int = 5000, seed: int = 0,
        cached_tokens_per_instance: int = 16_384) -> dict:
    """Decision latency of each router, and of booking a routed request, on one registry; the
    prefix-aware decision over `cached_tokens_per_instance` indexed on every instance."""
    uniform = RoutingConfig(local_prefill_max_tokens=64)
    slow_links = uniform.model_copy(update={"intra_node_kv_gbps": 100.0, "inter_node_kv_gbps": 10.0})
    reg = build_registry(n_instances, uniform, seed)
    rng = np.random.default_rng(seed + 1)
    requests = [RouteRequest(f"r{i}", int(rng.choice([int(rng.integers(16, 128)), 1000])), 128,
                             SLO(ttft_ms=2000, tpot_ms=200, priority=int(rng.integers(0, 3)))) for i in range(n_decisions)]
    prefill, decode, live_after = reg.view("prefill"), reg.view("decode"), 0.0 - reg.ttl_s

    def slo(cfg: RoutingConfig) -> Callable[[RouteRequest], Decision]:
        return lambda req: choose_slo(req, prefill, decode, live_after, cfg, KV_BYTES_PER_TOKEN)

    def book(req: RouteRequest) -> Decision:
        d = choose_slo(req, prefill, decode, live_after, uniform, KV_BYTES_PER_TOKEN)
        if d.outcome is Outcome.ROUTED:  # booked and released, so that every decision sees the same state
            reg.assign(req, d, 0.0)
            reg.release(req.request_id)
        return d

    report = {
        "instances": n_instances,
        "goal_p99_us": 100.0,
        "slo": _time(slo(uniform), requests),
        "slo_slow_links_between_nodes": _time(slo(slow_links), requests),
        "least_load": _time(lambda req: choose_least_load(req, prefill, decode, live_after), requests),
        "slo_decision_and_booking": _time(book, requests),
    }
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    systems = fill_prefix_index(reg, cached_tokens_per_instance, rng)
    fill_s = time.perf_counter() - start
    rss_mib = (psutil.Process().memory_info().rss - rss_before) / 2**20
    sharing = [replace(req, prefix_hashes=tuple(block_hashes(systems[i % SYSTEM_PROMPTS] +
                                                             rng.integers(0, VOCAB, 488).tolist())))
               for i, req in enumerate(requests)]

    def prefix_aware(req: RouteRequest) -> Decision:
        cached = reg.cached_tokens(("prefill", "decode"), req.prefix_hashes)
        return choose_slo(req, prefill, decode, live_after, uniform, KV_BYTES_PER_TOKEN,
                          prefill_cached=cached["prefill"], decode_cached=cached["decode"])

    report["slo_prefix_aware"] = {**_time(prefix_aware, sharing), "indexed_tokens_per_instance":
                                  cached_tokens_per_instance, "index_build_s": round(fill_s, 2),
                                  "index_rss_mib": round(rss_mib, 1)}
    return report
