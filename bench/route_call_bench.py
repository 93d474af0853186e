"""What a routing decision costs the ingress end to end: the controller deployed alone as a Ray
Serve application (its real class, instances kept live by load reports), called from this
process as an ingress calls it, through Serve's handle and over the controller's routing channel
(`controller/route_server.py`), the two alternating call by call so that both see the same
machine. Each call is a route request for a 1000-token prompt with its prefix hashes; the routed
request is released after its call, untimed, so every decision sees the same load."""

from __future__ import annotations

import asyncio
import secrets
import time

import numpy as np

from pdserve.config.routing import RoutingConfig
from pdserve.controller.decision import SLO, Outcome, RouteRequest
from pdserve.controller.instance import LoadReport
from pdserve.controller.prefix_index import block_hashes
from pdserve.deployments.route_channel import RouteChannel

APP = "route-call-bench"
KV_BYTES_PER_TOKEN = 23_040
REPORT_EVERY_S = 1.0
PROMPT_TOKENS = 1000
_SECRET = secrets.token_hex(16)


def _reports(n_instances: int) -> list[LoadReport]:
    """Half prefill, half decode instances (the decode ones with a KV address), lightly loaded."""
    reports = []
    for i in range(n_instances):
        pool, kv_addr = ("prefill", "") if i % 2 == 0 else ("decode", f"127.0.0.1:{7000 + i}")
        reports.append(LoadReport(f"{pool}-{i}", pool, f"node-{i // 8}", None, kv_addr, max_ongoing=64,
                                  started_at_s=1.0, running=i % 5, free_kv_blocks=4000, total_kv_blocks=4000))
    return reports


def _stats(samples_ms: list[float]) -> dict:
    a = np.array(samples_ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "mean_ms": round(float(a.mean()), 3)}


async def _measure(calls: int, rounds: int, n_instances: int) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("controller", APP)
    reports = _reports(n_instances)

    async def keep_live() -> None:
        while True:
            await asyncio.gather(*(handle.report.remote(r) for r in reports))
            await asyncio.sleep(REPORT_EVERY_S)

    live = asyncio.ensure_future(keep_live())
    paths: list[str] = []
    channel = RouteChannel(handle, _SECRET, paths.append)
    rng = np.random.default_rng(0)
    try:
        await asyncio.sleep(REPORT_EVERY_S)
        if not await channel.open():
            raise RuntimeError("the controller's routing channel did not open")
        by_path: dict[str, list[list[float]]] = {"serve_handle": [], "socket": []}
        routed = 0
        for r in range(rounds):
            samples: dict[str, list[float]] = {"serve_handle": [], "socket": []}
            for i in range(calls + 20):  # the first 20 warm both paths up, untimed
                req = RouteRequest(f"r{r}-{i}", PROMPT_TOKENS, 128, SLO(ttft_ms=5000, tpot_ms=200),
                                   prefix_hashes=tuple(block_hashes(rng.integers(0, 49_152, PROMPT_TOKENS).tolist())))
                order = ("serve_handle", "socket") if i % 2 == 0 else ("socket", "serve_handle")
                for path in order:
                    rid = f"{req.request_id}-{path}"
                    call = RouteRequest(rid, req.prompt_tokens, req.max_tokens, req.slo, prefix_hashes=req.prefix_hashes)
                    start = time.perf_counter()
                    if path == "socket":
                        decision = await channel.choose(call, False)
                    else:
                        decision = await handle.choose.remote(call, False)
                    elapsed_ms = (time.perf_counter() - start) * 1e3
                    if i >= 20:
                        samples[path].append(elapsed_ms)
                        routed += decision.outcome is Outcome.ROUTED
                    await handle.release.remote(rid)
            for path, s in samples.items():
                by_path[path].append(s)
        if paths.count("serve_handle"):
            raise RuntimeError(f"{paths.count('serve_handle')} channel calls went through Serve's handle: the "
                               "routing channel was not open")
    finally:
        live.cancel()
        await channel.close()
    report = {"instances": n_instances, "calls_per_path": calls * rounds, "rounds": rounds,
              "routed": routed, "prompt_tokens": PROMPT_TOKENS}
    for path, per_round in by_path.items():
        report[path] = {**_stats([x for s in per_round for x in s]),
                        "p50_ms_by_round": [round(float(np.median(s)), 3) for s in per_round]}
    report["p50_saved_ms"] = round(report["serve_handle"]["p50_ms"] - report["socket"]["p50_ms"], 3)
    return report


def run(calls: int = 300, rounds: int = 3, n_instances: int = 16) -> dict:
    """Start Ray and the controller, time `calls` route calls per path in each of `rounds`, stop."""
    import ray
    from ray import serve

    from pdserve.controller.server import Controller

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = serve.deployment(Controller).options(name="controller", num_replicas=1,
                                                   ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
        serve.run(app.bind("disaggregated", RoutingConfig(), KV_BYTES_PER_TOKEN, log_level="WARNING", app_name=APP,
                           route_secret=_SECRET), name=APP, route_prefix=None)
        return asyncio.run(_measure(calls, rounds, n_instances))
    finally:
        serve.shutdown()
        ray.shutdown()
