"""The SLO-aware controller against the least-load router on a real service, same
requests, same run; then the SLO-aware one under overload.

1. Calibrate: with the service idle, one request of each kind at a time (chat, long
   prompt) gives the unloaded TTFT and TPOT; objectives are `slo_scale` times those
   (per kind, sent with each request, as DistServe states SLOs), and the service's
   capacity is estimated as the rate one prefill engine sustains on the mix.
2. The same bursty trace (gamma arrivals at `load` x capacity) against the least-load
   router, then against the SLO-aware one (which refuses what it predicts will miss).
3. The SLO-aware router under `overload` x capacity: attainment of the admitted requests
   and how fast refusals come back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pdserve.bench.loadgen import RequestResult, RequestSpec, gamma_arrivals, mixed_prompts, run_load, summarize
from pdserve.config.cluster import ClusterConfig


@dataclass(frozen=True)
class Workload:
    requests: int = 60
    load: float = 1.0
    """Arrival rate as a multiple of the estimated capacity."""
    overload: float = 3.0
    overload_s: float = 40.0
    burstiness: float = 4.0
    """Squared coefficient of variation of the gaps (1 = Poisson)."""
    long_fraction: float = 0.3
    long_tokens: int = 1000
    max_tokens: int = 32
    slo_scale: float = 3.0
    seed: int = 0


def trace_specs(w: Workload, rate_rps: float, n: int, objectives: dict[str, tuple[float, float]], seed: int
                ) -> list[RequestSpec]:
    """n requests of `w`'s mix at gamma arrivals of `rate_rps`, each carrying its kind's objectives."""
    arrivals = gamma_arrivals(rate_rps, n, w.burstiness, seed)
    prompts = mixed_prompts(n, w.long_fraction, w.long_tokens, seed)
    return [RequestSpec(t, _as_dialogue(kind, prompt), w.max_tokens, kind, *objectives[kind])
            for t, (kind, prompt) in zip(arrivals, prompts, strict=True)]


def trace_within(w: Workload, rate_rps: float, window_s: float, objectives: dict[str, tuple[float, float]],
                 seed: int) -> list[RequestSpec]:
    """`trace_specs` for a time window rather than a count: every arrival before `window_s`."""
    enough = int(rate_rps * window_s * 1.5) + 10  # surely outlasts the window; the rest are cut
    return [q for q in trace_specs(w, rate_rps, enough, objectives, seed) if q.arrival_s < window_s]


def _as_dialogue(kind: str, prompt: str) -> str:
    """A chat question as a completion prompt the model answers at length (asked bare, an
    instruct model often ends at once, which would leave nothing to decode)."""
    return f"Question: {prompt}\nAnswer in detail:" if kind == "chat" else prompt


async def drive(url: str, model: str, specs: list[RequestSpec], progress: Callable[[int, int], None] | None) -> dict:
    """Send `specs` open loop and summarize them (`phase_summary`)."""
    start = time.perf_counter()
    results = await run_load(url, model, specs, timeout_s=600.0, progress=progress)
    return phase_summary(specs, results, time.perf_counter() - start)


def phase_summary(specs: list[RequestSpec], results: list[RequestResult], duration_s: float) -> dict:
    """`summarize` with each request judged against its own spec's objectives, plus the first few
    distinct error messages (a failed request's cause, without a log to dig through)."""
    return {**summarize(results, duration_s, [(s.ttft_ms, s.tpot_ms) for s in specs]), "duration_s": duration_s,
            "errors": sorted({r.error[:200] for r in results if r.outcome == "error"})[:5]}


UNJUDGED_MS = (600_000.0, 60_000.0)
"""(ttft_ms, tpot_ms) of warm-up and calibration requests: beyond any latency here, so that the
service's default objectives (which a long prompt on a slow machine can miss) do not refuse requests
that are only being timed."""


PROBE_SEED = 1_000_003
"""Added to the workload's seed for the long prompts timed alone: traces draw theirs from the seed
and the seed + 1, and a probe equal to a trace's prompt would find it in the prefix cache."""
CALIBRATION_ROUNDS = 4
"""Requests of each kind calibration times, the first as a warm-up."""


def probe_prompts(w: Workload, i: int = 0) -> tuple[tuple[str, str], ...]:
    """(kind, prompt): a chat question and the `i`-th long prompt timed alone. Long prompts differ
    for each `i`: timed again, one prompt would be served from the engines' prefix cache, and
    objectives set from that (a third of an uncached prefill here) no long prompt could meet. The
    chat prompt fits in less than one KV block (128 tokens on CPUs, 16 on GPUs: it is cached there,
    which a chat's one-block prefill barely notices)."""
    longs = mixed_prompts(i + 1, 1.0, w.long_tokens, w.seed + PROBE_SEED)
    return (("chat", _as_dialogue("chat", "What is the capital of France?")), ("long", longs[i][1]))


def warm_up(url: str, model: str, w: Workload) -> None:
    """One request of each kind, one at a time, left out of the figures: a freshly deployed
    application's first requests also pay for Serve's handles finding the new replicas."""
    for kind, prompt in probe_prompts(w):
        asyncio.run(run_load(url, model, [RequestSpec(0.0, prompt, w.max_tokens, kind, *UNJUDGED_MS)],
                             timeout_s=600.0))


def calibrate(url: str, model: str, w: Workload) -> dict:
    """Unloaded TTFT/TPOT per kind (median of 3, after one warm-up each), on prompts no earlier
    request sent (`probe_prompts`)."""
    measured: dict[str, dict] = {}
    rounds = [probe_prompts(w, 1 + i) for i in range(CALIBRATION_ROUNDS)]
    for k, kind in enumerate(("chat", "long")):
        specs = [RequestSpec(0.0, prompts[k][1], w.max_tokens, kind, *UNJUDGED_MS) for prompts in rounds]
        results = [asyncio.run(run_load(url, model, [s], timeout_s=600.0))[0] for s in specs]
        if any(r.outcome != "ok" or r.tpot_ms is None for r in results[1:]):  # the first one warms up
            raise RuntimeError(f"calibration request failed or made one token: {[(r.outcome, r.error) for r in results]}")
        measured[kind] = {"ttft_ms": float(np.median([r.ttft_ms for r in results[1:]])),
                          "tpot_ms": float(np.median([r.tpot_ms for r in results[1:]]))}
    prefill_s = (1 - w.long_fraction) * measured["chat"]["ttft_ms"] / 1e3 + w.long_fraction * measured["long"][
        "ttft_ms"] / 1e3
    return {"unloaded": measured, "capacity_rps": 1.0 / prefill_s}


def objectives_for(calibration: dict, slo_scale: float) -> dict[str, tuple[float, float]]:
    """(ttft_ms, tpot_ms) per kind: `slo_scale` x the kind's unloaded latency."""
    return {k: (v["ttft_ms"] * slo_scale, v["tpot_ms"] * slo_scale) for k, v in calibration["unloaded"].items()}


def run(cfg: ClusterConfig, model_path: str, w: Workload, progress: Callable[[str, int, int], None] | None = None
        ) -> dict:
    """Deploy `cfg` with each routing policy in turn on one local Ray cluster and compare."""
    from pdserve.deployments import service
    from pdserve.prefill.engine import served_model_name

    def phase(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    policies = {"least_load": cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"policy": "least_load"})}),
                "slo": cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"policy": "slo"})})}
    report: dict = {"workload": w.__dict__}
    svc = service.start(policies["least_load"], model_path)
    try:
        model = served_model_name(svc.cfg, model_path)
        cal = calibrate(svc.http_url, model, w)
        objectives = objectives_for(cal, w.slo_scale)
        report["calibration"] = cal
        report["objectives_ms"] = {k: {"ttft_ms": round(t, 1), "tpot_ms": round(p, 1)} for k, (t, p) in
                                   objectives.items()}
        rate = w.load * cal["capacity_rps"]
        specs = trace_specs(w, rate, w.requests, objectives, w.seed)
        report["rate_rps"] = round(rate, 3)
        report["least_load"] = asyncio.run(drive(svc.http_url, model, specs, phase("least_load")))
        svc.delete()
        svc = service.deploy(policies["slo"], model_path, svc.started_ray)
        warm_up(svc.http_url, model, w)
        report["slo"] = asyncio.run(drive(svc.http_url, model, specs, phase("slo")))
        over_rate = w.overload * cal["capacity_rps"]
        over = trace_specs(w, over_rate, max(1, int(over_rate * w.overload_s)), objectives, w.seed + 1)
        report["overload"] = {"rate_rps": round(over_rate, 3),
                              **asyncio.run(drive(svc.http_url, model, over, phase("overload")))}
    finally:
        svc.stop()
    ll, slo = report["least_load"]["goodput_rps"], report["slo"]["goodput_rps"]
    report["goodput_ratio_slo_over_least_load"] = round(slo / ll, 3) if ll else None
    o = report["overload"]
    report["goals"] = {
        "overload_admitted_attainment": {"target": 0.9, "value": o["attainment_admitted"],
                                         "met": (o["attainment_admitted"] or 0) >= 0.9},
        "overload_reject_p99_ms": {"target": 50.0, "value": (o["reject_ms"] or {}).get("p99"),
                                   "met": bool(o["reject_ms"]) and o["reject_ms"]["p99"] < 50.0},
    }
    return report
