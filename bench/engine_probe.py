"""Unloaded latencies of a running service, and what pdserve adds in front of its engines.

Requests of the same (short) prompt length go one at a time, in turn, through the whole service
(HTTP client -> the ingress's own HTTP server, or Serve's proxy -> ingress -> controller ->
engines, KV transfer in a disaggregated service), through Serve's proxy as a baseline where the
service URL is the ingress's own server, and straight to one engine replica: a Ray Serve handle
call from this process, the engine prefilling and decoding by itself (that one handle call is
all that is between). The prompts of a probe differ in content, so none finds another's KV in a
prefix cache. The median of the per-probe TTFT differences is the latency pdserve adds. Short
prompts keep the engine's own TTFT, and its noise, small next to what is measured (with the
workload's prompts, 10 pairs on 2 cores gave medians from -7 to +88 ms for the same service).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pdserve.bench.loadgen import RequestResult, RequestSpec, percentiles, run_load
from pdserve.bench.workloads import SampledRequest
from pdserve.controller.decision import SLO
from pdserve.prefill.requests import GenerateRequest, Sampling

_PAIR_MAX_TOKENS = 2  # the first token is all the comparison needs; a second proves it streams


@dataclass(frozen=True)
class EngineTarget:
    """One engine replica of a deployed application, reached through a Serve handle."""

    app_name: str
    pool: str  # "decode", "colocated" or "adaptive": prefills and decodes by itself; "prefill": its prefill call
    replica_id: str
    lease_ms: int


async def find_engines(app_name: str, mode: str, lease_ms: int, timeout_s: float = 60.0) -> list[EngineTarget]:
    """The engine replicas a first token comes from (the first live one of each pool, by id): the
    pool's, colocated or adaptive; disaggregated, the decode pool's (a prompt prefilled where it
    decodes) and the prefill pool's (a prompt whose KV moves: its first token is the prefill's)."""
    from ray import serve

    pools = [mode] if mode in ("colocated", "adaptive") else ["decode", "prefill"]
    controller = serve.get_deployment_handle("controller", app_name=app_name)
    deadline = time.monotonic() + timeout_s
    while True:
        live = sorted((i["replica_id"], i["pool"]) for i in await controller.snapshot.remote() if i["live"])
        first = {pool: next((r for r, p in live if p == pool), None) for pool in pools}
        if all(first.values()):
            return [EngineTarget(app_name, pool, replica_id, lease_ms) for pool, replica_id in first.items()]
        if time.monotonic() > deadline:
            missing = [pool for pool, r in first.items() if r is None]
            raise RuntimeError(f"no live {' or '.join(missing)} replica reported to the controller within {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


async def direct_ttft_ms(engine: EngineTarget, prompt_token_ids: list[int]) -> float:
    """TTFT of a greedy request sent straight to the engine replica, from this process: a prefill
    replica's prefill call moving no KV (it returns with the first token), another replica's
    answer prefilled where it decodes."""
    from ray import serve

    handle = serve.get_deployment_handle(engine.pool, app_name=engine.app_name)
    req = GenerateRequest(uuid.uuid4().hex, list(prompt_token_ids),
                          Sampling(max_tokens=_PAIR_MAX_TOKENS, temperature=0.0, ignore_eos=True),
                          SLO(ttft_ms=3_600_000.0, tpot_ms=600_000.0))
    start = time.perf_counter()
    if engine.pool == "prefill":
        first = await handle.prefill.remote(req, None, engine.lease_ms, replica_id=engine.replica_id)
        if not first["token_ids"]:
            raise RuntimeError(f"the prefill engine answered {req.request_id} without a token")
        return (time.perf_counter() - start) * 1e3
    first_ms = None
    stream = handle.options(stream=True).generate.remote(req, _PAIR_MAX_TOKENS, engine.lease_ms,
                                                         replica_id=engine.replica_id, local_prefill=True)
    async for chunk in stream:
        if chunk.token_ids and first_ms is None:
            first_ms = (time.perf_counter() - start) * 1e3
    if first_ms is None:
        raise RuntimeError(f"the {engine.pool} engine answered {req.request_id} without a token")
    return first_ms


def first_token_engine(result: RequestResult, engines: list[EngineTarget]) -> int:
    """Which of `engines` gave `result` its first token: the prefill replica where its KV moved
    (`usage.kv_transfer`), else the one prefilling where it decodes. A pool of several replicas
    is stood for by its first: which of them served is not in the answer."""
    moved = result.kv_transfer is not None
    return next((i for i, e in enumerate(engines) if (e.pool == "prefill") == moved), 0)


async def calibrate(http_url: str, model: str, engines: list[EngineTarget], unloaded: list[SampledRequest],
                    probes: list[tuple[SampledRequest, ...]], warmup: SampledRequest, max_tokens: int,
                    progress: Callable[[int, int], None] | None = None,
                    proxy_url: str | None = None) -> tuple[dict, list[RequestResult]]:
    """Send the `unloaded` requests through the service one at a time (at most `max_tokens` of each
    output): the service's unloaded TTFT and TPOT. Then, with `engines`, each probe's requests, of
    one length, one at a time, in an order that rotates from one probe to the next: the first
    through the service; with a `proxy_url` (the service's `http_url` is then the ingress's own
    server) the second through Serve's proxy, the baseline that server is measured against in the
    same run; the next ones straight to each engine. Each request through the service is set
    against its own probe's request to the engine that gave it its first token
    (`first_token_engine`): the latency pdserve adds. `warmup` goes every way first and is not
    counted: a freshly deployed application's first calls also pay for Serve's handles finding the
    new replicas. Returns the figures, and the unloaded requests' results.
    """
    urls = [http_url] + ([proxy_url] if proxy_url else [])
    for url in urls:
        (warm,) = await run_load(url, model, [RequestSpec(0.0, warmup.prompt_token_ids, 2, "warmup")], 600.0)
        if warm.outcome != "ok":
            raise RuntimeError(f"the service at {url} did not answer a warm-up request: {warm.status} {warm.error}")
    for engine in engines:
        await direct_ttft_ms(engine, warmup.prompt_token_ids)
    total = len(unloaded) + (len(probes) if engines else 0)
    results = []
    for i, req in enumerate(unloaded):
        results.append(await _through_service(http_url, model, req.prompt_token_ids, min(req.output_tokens, max_tokens)))
        if progress is not None:
            progress(i + 1, total)
    out = {"requests": len(results),
           "prompt_tokens": [len(r.prompt_token_ids) for r in unloaded],
           "ttft_ms": percentiles([r.ttft_ms for r in results if r.ttft_ms is not None], (50, 90)),
           "tpot_ms": percentiles([r.tpot_ms for r in results if r.tpot_ms is not None], (50, 90))}
    if not engines:
        return out, results
    served: dict[str, list[RequestResult]] = {"service": [], "proxy": []}
    direct_ms: list[list[float]] = [[] for _ in engines]
    for i, probe in enumerate(probes):
        assert len(probe) >= 2 + len(engines), "a probe holds a request for the service, the proxy and each engine"
        legs = [("service", probe[0])] + ([("proxy", probe[1])] if proxy_url else [])
        legs += list(enumerate(probe[2:2 + len(engines)]))
        for leg, req in legs[i % len(legs):] + legs[:i % len(legs)]:
            if isinstance(leg, int):
                direct_ms[leg].append(await direct_ttft_ms(engines[leg], req.prompt_token_ids))
            else:
                url = http_url if leg == "service" else proxy_url
                served[leg].append(await _through_service(url, model, req.prompt_token_ids, _PAIR_MAX_TOKENS))
        if progress is not None:
            progress(len(unloaded) + i + 1, total)
    out["added_latency"] = {"engines": {f"{e.pool} replica {e.replica_id}": percentiles(ms, (50, 90))
                                        for e, ms in zip(engines, direct_ms, strict=True)},
                            "prompt_tokens": len(probes[0][0].prompt_token_ids) if probes else None,
                            "pairs": len(served["service"]),
                            "path": "ingress" if proxy_url else "proxy",
                            **_added(served["service"], direct_ms, engines)}
    if proxy_url:
        out["added_latency"]["via_proxy"] = _added(served["proxy"], direct_ms, engines)
    return out, results


def _added(served: list[RequestResult], direct_ms: list[list[float]], engines: list[EngineTarget]) -> dict:
    """TTFT through the service against straight to the engine that gave the first token, probe by
    probe. The ingress measures TTFT too (usage.slo): from the request reaching it to the first
    token reaching it, which splits what is added into the HTTP side (client, HTTP server, Serve's
    proxy when it is in the way) and the ingress side (routing, the engine call, a disaggregated
    request's KV push)."""
    firsts = [first_token_engine(r, engines) for r in served]
    direct = [direct_ms[e][i] for i, e in enumerate(firsts)]
    added = [r.ttft_ms - d for r, d in zip(served, direct, strict=True)]
    split = [(r.ttft_ms - r.server_slo["ttft_ms"], r.server_slo["ttft_ms"] - d)
             for r, d in zip(served, direct, strict=True) if r.server_slo and r.server_slo.get("ttft_ms") is not None]
    return {"service_ttft_ms": percentiles([r.ttft_ms for r in served], (50, 90)),
            "engine_ttft_ms": percentiles(direct, (50, 90)),
            "first_token_from": {f"{e.pool} replica {e.replica_id}": firsts.count(i) for i, e in enumerate(engines)},
            "added_ms": {**(percentiles(added, (50, 90)) or {}), "mean": float(np.mean(added)) if added else None},
            "http_ms": percentiles([h for h, _ in split], (50, 90)),
            "ingress_ms": percentiles([i for _, i in split], (50, 90))}


async def _through_service(http_url: str, model: str, prompt_token_ids: list[int], max_tokens: int) -> RequestResult:
    spec = RequestSpec(0.0, prompt_token_ids, max_tokens, "calibration", ignore_eos=True)
    (result,) = await run_load(http_url, model, [spec], timeout_s=600.0)
    if result.outcome != "ok" or result.ttft_ms is None:
        raise RuntimeError(f"calibration request failed: {result.status} {result.error}")
    return result
