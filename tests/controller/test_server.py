"""The controller's shell around the pure routing decision: probing predictions that have
refused every request for a while; holding requests, logged once; the engines' pushed metrics it
keeps for the ingress."""

import asyncio
import logging
import time
from dataclasses import replace

from pdserve.config.routing import RoutingConfig
from pdserve.controller.decision import Outcome
from pdserve.controller.server import Controller

from .routing_states import SLOW, add, book, request


def controller(probe_after_s: float = 5.0) -> Controller:
    c = Controller("disaggregated", RoutingConfig(profiles={"default": SLOW}, probe_after_s=probe_after_s),
                   kv_bytes_per_token=1000)
    now = time.monotonic()
    add(c.registry, "p", "prefill", now_s=now)  # 60 + 1.5 x 1000 tokens: ~1.6 s to the first token
    add(c.registry, "d", "decode", now_s=now)
    return c


def choose(c: Controller, ttft_ms: float, tpot_ms: float = 100):
    return asyncio.run(c.choose(request(1000, ttft_ms=ttft_ms, tpot_ms=tpot_ms)))


def test_after_refusing_everything_for_probe_after_s_one_near_miss_is_served_as_a_probe():
    c = controller()
    assert choose(c, ttft_ms=800).outcome is Outcome.REJECTED  # predicted ~2x its TTFT objective
    c._routed_at_s -= 6.0  # six seconds with nothing routed
    probe = choose(c, ttft_ms=800)
    assert probe.outcome is Outcome.ROUTED and probe.reason.startswith("probe after 6.0 s with nothing routed")
    assert choose(c, ttft_ms=800).outcome is Outcome.REJECTED  # one probe, then its latency decides


def test_no_probe_for_a_miss_no_prediction_error_explains_or_when_probing_is_off():
    c = controller()
    c._routed_at_s -= 60.0
    assert choose(c, ttft_ms=100).outcome is Outcome.REJECTED  # predicted ~16x its objective
    assert choose(c, ttft_ms=5000, tpot_ms=0.01).outcome is Outcome.REJECTED
    off = controller(probe_after_s=0)
    off._routed_at_s -= 60.0
    assert choose(off, ttft_ms=800).outcome is Outcome.REJECTED


def test_requests_routed_recently_leave_refusals_alone():
    c = controller()
    assert choose(c, ttft_ms=60_000).outcome is Outcome.ROUTED
    assert choose(c, ttft_ms=800).outcome is Outcome.REJECTED


def test_a_held_request_is_logged_when_first_held_and_when_served_and_an_answer_resuming_is_never_held(caplog):
    c = Controller("adaptive", RoutingConfig(profiles={"default": SLOW}), kv_bytes_per_token=1000, best_effort=True)
    now = time.monotonic()
    for rid in ("a", "b"):
        add(c.registry, rid, "adaptive", prefill_chunk_tokens=64, now_s=now)
        book(c.registry, f"r{rid}", 100, decode=rid, tpot_ms=50, now_s=now)  # no room for a 1000-token prompt's chunks
    caplog.set_level(logging.INFO, logger="pdserve.controller")
    first = asyncio.run(c.choose(request(1000)))
    again = asyncio.run(c.choose(replace(request(1000), held_ms=200.0)))
    assert first.outcome is Outcome.HELD and again.outcome is Outcome.HELD
    resumed = asyncio.run(c.choose(request(1000), resuming=True))
    assert resumed.outcome is Outcome.ROUTED and "decoding answers not spared" in resumed.reason
    served = asyncio.run(c.choose(replace(request(1000), held_ms=4900.0)))
    assert served.outcome is Outcome.ROUTED and served.reason.startswith("held 4900 ms, best effort")
    routes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("route ")]
    assert [m.split(": ")[1].split(",")[0] for m in routes] == ["held", "routed", "routed"]


def test_engine_metrics_are_those_live_replicas_pushed_last_and_a_gone_replicas_are_dropped():
    c = controller()
    asyncio.run(c.push_engine_metrics("p", "vllm:x 1\n"))
    asyncio.run(c.push_engine_metrics("d", "vllm:x 2\n"))
    asyncio.run(c.push_engine_metrics("d", "vllm:x 3\n"))
    assert asyncio.run(c.engine_metrics()) == {("prefill", "p"): "vllm:x 1\n", ("decode", "d"): "vllm:x 3\n"}
    c.registry.instances["p"].last_seen_s -= c.registry.ttl_s + 1  # its reports stopped
    assert asyncio.run(c.engine_metrics()) == {("decode", "d"): "vllm:x 3\n"}
    assert "p" not in c.engine_metrics_text
