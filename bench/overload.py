"""`pdserve bench overload`: the service at several times its capacity for a minute.

The issue's claims: the service stays up (no errors), what it admits meets its objectives at least
90% of the time, refusals are immediate (429 with Retry-After), memory stays bounded, and latency is
normal again within seconds after the load ends.

One deployment, calibrated as `bench slo` does (objectives: `slo_scale` x each kind's unloaded TTFT
and TPOT; capacity: the rate one prefill engine sustains on the mix). That estimate leaves out
decode and the engines sharing cores: on a 2-core machine the service serves several times less
within its objectives, so the overload is harsher than its multiple says (the report's goodput
shows by how much). Then three phases:
1. baseline: arrivals at `baseline_load` x capacity for `baseline_s`, for the normal latency;
2. overload: arrivals at `overload` x capacity for `duration_s`;
3. recovery: from the moment the overload's last arrival was due (what it admitted may still run),
   chat probes one after the other (at least `probe_gap_s` apart) for `recovery_s`, with the chat
   objectives.

Figures, goals and the report: `overload_report`. Memory: the RSS of this process and all its
descendants (with a local Ray cluster: Ray's daemons, Serve's replicas, the engines) every
`SAMPLE_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pdserve.bench.loadgen import RequestResult, RequestSpec, run_load
from pdserve.bench.overload_report import MemorySample, Phase, Probe, assemble
from pdserve.bench.overload_settings import OverloadSettings
from pdserve.bench.slo_compare import calibrate, objectives_for, probe_prompts, trace_within
from pdserve.bench.slo_compare import warm_up as warm_up_service
from pdserve.config.cluster import ClusterConfig

Progress = Callable[[str, int, int | None], None]
"""(phase, done, total or None when open ended)."""

SAMPLE_INTERVAL_S = 1.0


class RssSampler:
    """The RSS of this process tree every `SAMPLE_INTERVAL_S` on a daemon thread, labelled with
    `phase` (which the benchmark sets as it goes), so that memory can be told apart by phase."""

    def __init__(self) -> None:
        self.phase = "deploy"
        self.samples: list[tuple[float, str, int]] = []  # (time.monotonic() s, phase, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            total = 0
            for proc in (me, *me.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += proc.memory_info().rss
            self.samples.append((time.monotonic(), self.phase, total))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _bar(progress: Progress | None, phase: str) -> Callable[[int, int], None] | None:
    return (lambda done, total: progress(phase, done, total)) if progress else None


async def _overload_then_probes(url: str, model: str, specs: list[RequestSpec], probe: RequestSpec,
                                s: OverloadSettings, sampler: RssSampler, progress: Progress | None
                                ) -> tuple[float, list[RequestResult], list[Probe]]:
    """The overload's arrivals and, from the moment its last one was due, the recovery probes one
    after the other, while what the overload admitted runs on."""
    loop = asyncio.get_running_loop()
    start_s = loop.time()  # asyncio's clock is time.monotonic(), the sampler's
    load = asyncio.create_task(run_load(url, model, specs, timeout_s=600.0, progress=_bar(progress, "overload")))
    await asyncio.sleep(s.duration_s)
    end_s, sampler.phase, probes = loop.time(), "recovery", []
    while (sent_s := loop.time() - end_s) < s.recovery_s:
        r = (await run_load(url, model, [probe], timeout_s=600.0))[0]
        probes.append(Probe(round(sent_s, 3), r.outcome, r.ttft_ms, r.tpot_ms))
        if progress:
            progress("recovery", len(probes), None)
        await asyncio.sleep(max(0.0, end_s + sent_s + s.probe_gap_s - loop.time()))
    sampler.phase = "drain"
    return start_s, await load, probes


def load_calibration(path: str) -> dict:
    """The calibration of an earlier overload report, for a run that must offer the same trace
    against the same objectives (policies compared on one calibration, not one each)."""
    try:
        cal = json.loads(Path(path).read_text())["calibration"]
        unloaded = {kind: {k: float(cal["unloaded"][kind][k]) for k in ("ttft_ms", "tpot_ms")}
                    for kind in ("chat", "long")}
        capacity_rps = float(cal["capacity_rps"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--calibration {path}: not an overload report with a calibration ({err!r})") from err
    return {"unloaded": unloaded, "capacity_rps": capacity_rps, "from": path}


def _measure(url: str, model: str, s: OverloadSettings, sampler: RssSampler, progress: Progress | None,
             calibration: dict | None) -> tuple:
    """Calibrate, then the three phases: (calibration, objectives, baseline, overload, probes, and
    when the overload began on the sampler's clock). A given calibration replaces the measured one
    (kept as `measured`), which still runs: its requests are what the router first learns from."""
    w = s.workload()
    sampler.phase = "warm-up"
    warm_up_service(url, model, w)
    measured = calibrate(url, model, w)
    cal = {**calibration, "measured": measured} if calibration else measured
    objectives = objectives_for(cal, s.slo_scale)
    cal |= {"baseline_rps": s.baseline_load * cal["capacity_rps"], "overload_rps": s.overload * cal["capacity_rps"]}
    base = trace_within(w, cal["baseline_rps"], s.baseline_s, objectives, s.seed)
    over = trace_within(w, cal["overload_rps"], s.duration_s, objectives, s.seed + 1)
    probe = RequestSpec(0.0, probe_prompts(w)[0][1], s.probe_max_tokens, "chat", *objectives["chat"])
    sampler.phase, base_start_s = "baseline", time.monotonic()
    base_results = asyncio.run(run_load(url, model, base, timeout_s=600.0, progress=_bar(progress, "baseline")))
    base_s = time.monotonic() - base_start_s
    sampler.phase = "overload"
    over_start_s, over_results, probes = asyncio.run(_overload_then_probes(url, model, over, probe, s, sampler,
                                                                           progress))
    return (cal, objectives, Phase(base_start_s - over_start_s, base, base_results, base_s),
            Phase(0.0, over, over_results, s.duration_s), probes, over_start_s)


def run(cfg: ClusterConfig, model_path: str | None, s: OverloadSettings, url: str | None = None,
        progress: Progress | None = None, calibration: dict | None = None) -> dict:
    """Deploy `cfg` on a local Ray cluster (or drive the service at `url`, memory unsampled), run the
    phases (with `calibration` from `load_calibration`, the same trace as the run it came from),
    stop what was started, and return the report."""
    import httpx

    from pdserve.deployments import service
    from pdserve.prefill.engine import served_model_name

    sampler, svc = RssSampler(), None
    described = {"url": url} if url else {"mode": cfg.mode, "dtype": cfg.dtype, "routing": cfg.routing.policy,
                                           "on_unmeetable": cfg.slo.on_unmeetable,
                                           "replicas": {role: p.replicas for role, p in cfg.pools().items()}}
    try:
        if url is None:
            sampler.start()
            svc = service.start(cfg, model_path)
            url, model = svc.http_url, served_model_name(svc.cfg, model_path)
        else:
            models = httpx.get(url.rstrip("/") + "/v1/models", timeout=30.0).raise_for_status().json()["data"]
            model = models[0]["id"]
        *measured, over_start_s = _measure(url, model, s, sampler, progress, calibration)
    finally:
        sampler.stop()
        if svc is not None:
            svc.stop()
    samples = [MemorySample(t - over_start_s, p, b) for t, p, b in sampler.samples] if svc is not None else None
    return assemble(s, described, *measured, samples)
