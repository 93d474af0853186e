"""The load generator's arrivals, prompts, summary, and its streaming client against a fake SSE server."""

import asyncio
import json
import socket

import numpy as np
import pytest

from pdserve.bench.loadgen import (
    RequestResult,
    RequestSpec,
    gamma_arrivals,
    mixed_prompts,
    run_load,
    summarize,
)
from tests.bench.fake_service import FakeSSEServer


def test_gamma_arrivals_mean_gap_and_burstiness():
    poisson = np.diff(gamma_arrivals(10.0, 20000, 1.0, seed=1))
    bursty = np.diff(gamma_arrivals(10.0, 20000, 8.0, seed=1))
    assert abs(poisson.mean() - 0.1) < 0.005
    assert abs(bursty.mean() - 0.1) < 0.01
    assert bursty.var() > 3 * poisson.var()


def test_gamma_arrivals_deterministic_and_increasing():
    a = gamma_arrivals(5.0, 100, 2.0, seed=7)
    assert a == gamma_arrivals(5.0, 100, 2.0, seed=7)
    assert a != gamma_arrivals(5.0, 100, 2.0, seed=8)
    assert len(a) == 100 and a[0] == 0.0
    assert (np.diff(a) >= 0).all()
    assert gamma_arrivals(5.0, 0, 1.0, seed=0) == []


@pytest.mark.parametrize("rate, n, burstiness", [(0, 10, 1), (-1, 10, 1), (1, -1, 1), (1, 10, 0), (1, 10, -2)])
def test_gamma_arrivals_rejects_bad_args(rate, n, burstiness):
    with pytest.raises(ValueError):
        gamma_arrivals(rate, n, burstiness, seed=0)


def test_mixed_prompts_deterministic_and_fraction():
    prompts = mixed_prompts(2000, 0.25, 300, seed=3)
    assert prompts == mixed_prompts(2000, 0.25, 300, seed=3)
    longs = [p for kind, p in prompts if kind == "long"]
    chats = [p for kind, p in prompts if kind == "chat"]
    assert abs(len(longs) / len(prompts) - 0.25) < 0.04
    assert all(len(p.split()) == 300 for p in longs)
    assert all(5 <= len(p.split()) <= 20 for p in chats)
    assert len(set(longs)) == len(longs)  # no shared long prompts for a prefix cache to exploit
    assert {kind for kind, _ in mixed_prompts(50, 0.0, 10, seed=0)} == {"chat"}
    assert {kind for kind, _ in mixed_prompts(50, 1.0, 10, seed=0)} == {"long"}


def _result(kind, outcome, ttft=None, tpot=None, e2e=100.0, status=200):
    return RequestResult(kind, outcome, status, ttft, tpot, e2e, 10 if outcome == "ok" else 0, None, None)


def test_summarize_counts_goodput_and_attainment():
    results = [
        _result("chat", "ok", ttft=100.0, tpot=20.0),  # met
        _result("chat", "ok", ttft=150.0, tpot=None),  # met: a single token has no TPOT
        _result("long", "ok", ttft=100.0, tpot=80.0),  # missed only TPOT
        _result("long", "ok", ttft=900.0, tpot=20.0),  # missed TTFT
        _result("long", "rejected", e2e=4.0, status=429),
        _result("chat", "error", e2e=1.0, status=0),
    ]
    s = summarize(results, duration_s=4.0, objectives=[(500.0, 50.0)] * len(results))
    assert (s["requests"], s["ok"], s["rejected"], s["error"], s["met"]) == (6, 4, 1, 1, 2)
    assert s["goodput_rps"] == 0.5
    assert s["attainment_all"] == 2 / 6
    assert s["attainment_admitted"] == 0.5
    assert s["ttft_ms"]["p50"] == 125.0 and s["tpot_ms"]["p50"] == 20.0
    assert s["reject_ms"] == {"p50": 4.0, "p99": 4.0}
    assert s["by_kind"]["chat"] == {"requests": 3, "ok": 2, "rejected": 0, "error": 1, "met": 2}
    assert s["by_kind"]["long"] == {"requests": 3, "ok": 2, "rejected": 1, "error": 0, "met": 0}
    json.dumps(s)


def test_summarize_empty_and_all_rejected():
    s = summarize([_result("chat", "rejected", status=429)], 1.0, [(500.0, 50.0)])
    assert s["attainment_admitted"] is None and s["ttft_ms"] is None and s["tpot_ms"] is None
    assert s["attainment_all"] == 0.0 and s["goodput_rps"] == 0.0
    assert summarize([], 1.0, [])["reject_ms"] is None


def test_summarize_judges_each_request_against_its_own_objectives():
    results = [_result("chat", "ok", ttft=90.0, tpot=9.0), _result("long", "ok", ttft=900.0, tpot=11.0),
               _result("long", "ok", ttft=500.0), _result("chat", "rejected", e2e=7.0, status=429)]
    s = summarize(results, 2.0, [(100, 10), (1000, 10), (1000, 10), (100, 10)])
    assert (s["met"], s["ok"], s["rejected"]) == (2, 3, 1)  # the second missed its TPOT only
    assert s["goodput_rps"] == 1.0 and s["attainment_all"] == 0.5 and s["attainment_admitted"] == 2 / 3
    assert s["reject_ms"]["p99"] == 7.0


def test_run_load_against_fake_server():
    specs = [RequestSpec(0.0, "ok", 3, "chat", ttft_ms=500.0, priority=1),
             RequestSpec(0.05, "busy", 3, "long"),
             RequestSpec(0.0, "fail", 3, "chat")]
    seen: list[tuple[int, int]] = []

    async def go():
        async with FakeSSEServer() as server:
            results = await run_load(server.base_url, "m", specs, timeout_s=5.0,
                                     progress=lambda d, t: seen.append((d, t)))
            return server.bodies, results

    bodies, (ok, busy, fail) = asyncio.run(go())
    assert (ok.kind, ok.outcome, ok.status, ok.completion_tokens) == ("chat", "ok", 200, 3)
    assert ok.ttft_ms is not None and ok.tpot_ms is not None and ok.tpot_ms > 0
    assert ok.e2e_ms >= ok.ttft_ms and ok.server_slo == {"ttft_met": True}
    assert ok.text == "Hello world" and ok.cached_tokens is None  # no prompt_tokens_details: nothing claimed
    assert (busy.kind, busy.outcome, busy.status, busy.retry_after_s) == ("long", "rejected", 429, 2.0)
    assert (fail.outcome, fail.status) == ("error", 200) and "engine died" in fail.error
    assert sorted(seen) == [(1, 3), (2, 3), (3, 3)]
    sent = next(b for b in bodies if b["prompt"] == "ok")
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True} and sent["temperature"] == 0
    assert sent["ttft_ms"] == 500.0 and sent["priority"] == 1 and "tpot_ms" not in sent
    assert "ttft_ms" not in next(b for b in bodies if b["prompt"] == "busy")


def test_run_load_records_connection_errors():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [r] = asyncio.run(run_load(f"http://127.0.0.1:{port}", "m", [RequestSpec(0.0, "x", 1, "chat")], timeout_s=2.0))
    assert (r.outcome, r.status, r.ttft_ms) == ("error", 0, None) and r.error
