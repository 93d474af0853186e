"""Constructed instance states for the routing tests: registries fed by hand-made load
reports and assignments, on profiles with round numbers."""

from __future__ import annotations

from pdserve.config.routing import LatencyProfile
from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest, Target
from pdserve.controller.instance import LoadReport
from pdserve.controller.registry import Registry

# FAST prefills 3x faster than the default (SLOW) accelerator type.
FAST = LatencyProfile(prefill_base_ms=20, prefill_ms_per_token=0.5, decode_base_ms=20, decode_ms_per_seq=2,
                      decode_ms_per_1k_context_tokens=5)
SLOW = LatencyProfile(prefill_base_ms=60, prefill_ms_per_token=1.5, decode_base_ms=20, decode_ms_per_seq=2,
                      decode_ms_per_1k_context_tokens=5)


def registry() -> Registry:
    return Registry({"default": SLOW, "FAST": FAST}, ttl_s=3.0, kv_reserve_tokens=100)


def add(reg: Registry, rid: str, pool: str, *, node: str = "n1", accelerator: str | None = None,
        free_kv_blocks: int = 1000, max_ongoing: int = 8, now_s: float = 0.0, **fields) -> None:
    """Report instance `rid` (a first report: what it says it runs is taken as given)."""
    kv = f"10.0.0.1:{5000 + len(reg.instances)}" if pool != "prefill" else ""
    reg.report(LoadReport(rid, pool, node, accelerator, kv, max_ongoing, 1.0, free_kv_blocks=free_kv_blocks,
                          total_kv_blocks=1000, block_size=16, **fields), now_s)


def book(reg: Registry, request_id: str, prompt_tokens: int, *, prefill: str | None = None,
         decode: str | None = None, tpot_ms: float = 1000.0, max_tokens: int = 10, now_s: float = 0.0) -> None:
    """Book a request the controller routed earlier (its prompt queued on `prefill`, its
    sequence running on `decode`)."""
    def target(rid: str | None) -> Target | None:
        return Target(rid, reg.instances[rid].report.kv_addr, 0, reg.instances[rid].report.pool) if rid else None

    req = RouteRequest(request_id, prompt_tokens, max_tokens, SLO(ttft_ms=1e6, tpot_ms=tpot_ms))
    reg.assign(req, Decision(Outcome.ROUTED, target(prefill), target(decode)), now_s=now_s)
    if prefill is None and decode is not None:  # already prefilled there, as predicted: now decoding
        reg.prefill_done(request_id, sum(reg.instances[decode].assignments[request_id].predicted_prefill_ms), now_s=now_s)


def request(prompt_tokens: int, ttft_ms: float = 5000, tpot_ms: float = 100, priority: int = 0,
            max_tokens: int = 50) -> RouteRequest:
    return RouteRequest("r", prompt_tokens, max_tokens, SLO(ttft_ms, tpot_ms, priority))
