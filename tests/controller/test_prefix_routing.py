"""Routing that knows the engines' prefix caches: a prompt is charged on each instance only for
what that instance would compute, from the cache events its reports carry."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

from pdserve.config.routing import RoutingConfig
from pdserve.controller.decision import RouteRequest
from pdserve.controller.instance import LoadReport
from pdserve.controller.prefix_index import CacheEvents, Removed, Stored, block_hashes
from pdserve.controller.registry import Registry
from pdserve.controller.server import Controller
from pdserve.controller.slo_router import choose_slo

from .routing_states import SLOW, add, book, registry, request

CFG = RoutingConfig(local_prefill_max_tokens=0)
PROMPT = list(range(1000, 2000))
"""A 1,000-token prompt; block size 16 in these reports."""


def cache(reg: Registry, rid: str, tokens: list[int], now_s: float = 0.0, **report) -> None:
    """`rid` reports that its prefix cache stored `tokens` (whole 16-token blocks), in one event."""
    blocks = len(tokens) // 16
    event = Stored(None, tuple(f"{rid}-{k}" for k in range(blocks)), tuple(tokens[:blocks * 16]), 16)
    base = reg.instances[rid].report
    reg.report(dataclasses.replace(base, cache=CacheEvents((event,)), **report), now_s)


def asking(tokens: list[int], **kw) -> RouteRequest:
    return dataclasses.replace(request(len(tokens), **kw), prefix_hashes=tuple(block_hashes(tokens)))


def route(reg: Registry, req: RouteRequest, cfg: RoutingConfig = CFG):
    cached = reg.cached_tokens(("prefill", "decode"), req.prefix_hashes)
    return choose_slo(req, reg.view("prefill"), reg.view("decode"), -reg.ttl_s, cfg, 1000,
                      prefill_cached=cached["prefill"], decode_cached=cached["decode"])


def pools() -> Registry:
    reg = registry()
    add(reg, "p1", "prefill")
    add(reg, "p2", "prefill")
    add(reg, "d", "decode")
    return reg


def test_the_prefill_instance_holding_the_prefix_is_chosen_and_charged_only_for_the_rest():
    reg = pools()
    cache(reg, "p2", PROMPT[:800])
    d = route(reg, asking(PROMPT))
    assert d.prefill.replica_id == "p2" and d.cached_tokens == 800
    assert math.isclose(d.predicted_ttft_ms, 60 + 1.5 * 200)  # not 60 + 1.5 x 1000
    assert "800 prompt tokens cached" in d.reason
    reg.assign(asking(PROMPT), d, 0.0)
    assert reg.instances["p2"].queued_prefill_tokens() == 200  # its queue holds what it computes
    blind = route(reg, request(len(PROMPT)))  # no hashes: every prompt charged whole
    assert blind.prefill.replica_id == "p1" and blind.cached_tokens == 0


def test_a_wholly_cached_prompt_still_computes_its_last_token():
    reg = pools()
    whole = PROMPT[:992]  # 62 whole blocks
    cache(reg, "p1", whole + [1, 2, 3, 4, 5, 6, 7, 8] * 2)
    d = route(reg, asking(whole))
    assert d.cached_tokens == 991 and math.isclose(d.predicted_ttft_ms, 60 + 1.5)
    assert route(reg, asking(PROMPT)).cached_tokens == 992  # a partial last block is never cached


def test_what_the_decode_instance_holds_is_left_out_of_the_transfer_it_is_sent():
    reg = pools()
    cache(reg, "d", PROMPT[:608])  # an earlier turn, decoded there
    cache(reg, "p1", PROMPT[:800])
    d = route(reg, asking(PROMPT))
    assert (d.prefill.replica_id, d.cached_tokens, d.decode_cached_tokens) == ("p1", 800, 608)
    assert "608 held by the decode instance are not moved" in d.reason
    assert route(reg, request(len(PROMPT))).decode_cached_tokens == 0  # cache-blind: all of it moves


def test_a_later_turn_prefills_just_its_new_tokens_on_the_decode_instance_holding_its_history():
    reg = pools()
    add(reg, "d2", "decode")
    cache(reg, "d2", PROMPT[:960])  # the earlier turns, answers included, decoded there
    d = route(reg, asking(PROMPT), RoutingConfig())  # local prefill up to 64 tokens computed
    assert d.prefill is None and d.decode.replica_id == "d2" and d.cached_tokens == 960
    assert "local prefill, 960 prompt tokens cached" in d.reason
    blind = route(reg, request(len(PROMPT)), RoutingConfig())
    assert blind.prefill is not None  # 1,000 tokens to compute: beyond a decode instance's limit


def test_evictions_and_a_restarted_or_departed_replica_take_its_cache_out_of_routing():
    reg = pools()
    cache(reg, "p2", PROMPT[:800])
    evicted = tuple(f"p2-{k}" for k in range(49, 9, -1))  # last first, as vLLM evicts
    reg.report(dataclasses.replace(reg.instances["p2"].report, cache=CacheEvents((Removed(evicted),))), 0.0)
    assert route(reg, asking(PROMPT)).cached_tokens == 160  # blocks 0-9 are left
    restarted = dataclasses.replace(reg.instances["p2"].report, started_at_s=2.0, cache=None)
    reg.report(restarted, 0.0)
    assert list(reg.cached_tokens(("prefill",), asking(PROMPT).prefix_hashes)["prefill"]) == [0, 0]
    cache(reg, "p1", PROMPT[:800])
    reg.forget("p1", "gone")
    assert list(reg.cached_tokens(("prefill",), asking(PROMPT).prefix_hashes)["prefill"]) == [0]


def test_a_replica_taking_a_forgotten_ones_index_number_starts_with_nothing_cached():
    """Numbers are reused, so that the index's holder bitmaps stay as wide as the cluster."""
    reg = pools()
    cache(reg, "p1", PROMPT[:800])
    number = reg._number("p1")
    reg.forget("p1", "gone", now_s=0.0)
    add(reg, "p3", "prefill")
    assert reg._number("p3") == number
    assert list(reg.cached_tokens(("prefill",), asking(PROMPT).prefix_hashes)["prefill"]) == [0, 0]
    cache(reg, "p3", PROMPT[:320])
    assert route(reg, asking(PROMPT)).prefill.replica_id == "p3"


def test_the_controller_looks_prefixes_up_unless_routing_is_cache_blind():
    for prefix_aware, expected in ((True, "p2"), (False, "p1")):
        c = Controller("disaggregated", RoutingConfig(profiles={"default": SLOW}, prefix_aware=prefix_aware),
                       kv_bytes_per_token=1000)
        now = time.monotonic()
        for rid, pool in (("p1", "prefill"), ("p2", "prefill"), ("d", "decode")):
            add(c.registry, rid, pool, now_s=now)
        cache(c.registry, "p2", PROMPT[:800], now_s=now)
        decision = asyncio.run(c.choose(asking(PROMPT)))
        assert decision.prefill.replica_id == expected


def test_a_report_without_cache_events_keeps_what_the_index_knows():
    reg = pools()
    cache(reg, "p2", PROMPT[:800])
    reg.report(LoadReport("p2", "prefill", "n1", None, "", 8, 1.0, block_size=16), 0.0)
    assert route(reg, asking(PROMPT)).cached_tokens == 800


def test_a_sessions_next_turn_follows_its_kv_before_any_cache_event_says_where_it_is():
    c = Controller("disaggregated", RoutingConfig(profiles={"default": SLOW}), kv_bytes_per_token=1000)
    now = time.monotonic()
    add(c.registry, "p1", "prefill", now_s=now, queued_prefill_tokens=300)
    add(c.registry, "p2", "prefill", now_s=now)
    add(c.registry, "d", "decode", now_s=now)
    first = dataclasses.replace(asking(PROMPT), request_id="turn-1", session_id="trip")
    assert asyncio.run(c.choose(first)).prefill.replica_id == "p2"  # p1 has a queue
    c.registry.prefill_done("turn-1", 1560.0, now_s=0.0)
    c.registry.release("turn-1")
    book(c.registry, "busy", 400, prefill="p2")  # now p2 has the longer queue
    later = PROMPT + list(range(200))
    second = dataclasses.replace(asking(later), request_id="turn-2", session_id="trip")
    routed = asyncio.run(c.choose(second))
    assert routed.prefill.replica_id == "p2" and routed.cached_tokens == 992  # its first turn's whole pieces
    stranger = dataclasses.replace(asking(later), request_id="other", session_id="someone-else")
    assert asyncio.run(c.choose(stranger)).prefill.replica_id == "p1"  # cache-blind: the shorter queue
