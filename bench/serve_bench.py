"""`pdserve bench serve`: goodput of one or more service configurations on one workload.

For each configuration, one after the other on the same machine and with the same requests:
1. calibrate (`engine_probe`): unloaded TTFT/TPOT, and the latency pdserve adds in front of
   an engine. The first configuration's unloaded p90 TTFT and TPOT are the reference
   objectives; objectives at SLO scale s are s times both (as DistServe scales its SLOs), in a
   grid each has its own scale, and absolute objectives are taken as given (DistServe's
   per-application objectives): the same for every configuration (`serve_settings.judged_objectives`).
2. runs at rates chosen by the goodput search (`goodput.search_goodput`), one per objective
   setting; a rate is measured once and every setting's attainment is computed from the same
   requests. With `send_objectives` the requests carry a setting's objectives, so each setting
   is searched on runs of its own.
   Every rate sends the same lengths at the arrival times of one unit-rate trace divided by
   the rate; prompt contents are fresh per rate (see `Requests`).

Requests go with `ignore_eos`, so each generates the output length its workload drew.
The services run with `slo.on_unmeetable: best_effort`: every request is served and its
latencies measured, which is what lets every setting be judged from one run per rate.
(Early rejection is what `pdserve bench slo` measures.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pdserve.bench import engine_probe, serve_report, sweep_report
from pdserve.bench.conversations import (
    Conversation,
    ConversationWorkload,
    first_turn_lengths,
    make_conversations,
    run_conversations,
)
from pdserve.bench.goodput import attainment, search_goodput
from pdserve.bench.loadgen import RequestSpec, gamma_arrivals, run_load
from pdserve.bench.serve_settings import (
    Objective,
    Progress,
    Run,
    ServeBenchSettings,
    Target,
    judged_objectives,
    parse_configuration,
)
from pdserve.bench.workloads import AnyWorkload, SampledRequest, make_requests, sample_lengths, word_token_ids

log = logging.getLogger("pdserve.bench.serve")

@dataclass
class Requests:
    """The same request lengths and arrival pattern for every configuration and rate.

    Prompt contents change from one rate to the next, and from one setting's runs to the next's
    when requests carry their setting's objectives (and are the same for every configuration at a
    rate and setting): engines keep what earlier runs computed in their prefix caches, and prompts
    seen before would be prefilled from there, cheaper than the workload says.
    With a conversation workload each arrival is a conversation, whose turns follow its answers.
    """

    load_lengths: list[tuple[int, int]]  # (prompt_tokens, output_tokens): single requests, or first turns
    unit_arrivals_s: list[float]  # arrival offsets at 1 request (or conversation) per second
    vocabulary: list[int]
    seed: int
    calibration: list[SampledRequest]  # the workload's lengths, sent unloaded
    probes: list[tuple[SampledRequest, ...]]  # (through the service, through Serve's proxy, straight to each of two engines)
    warmup: SampledRequest
    conversation: ConversationWorkload | None = None  # each arrival is a conversation of this workload
    encode: Callable[[str], list[int]] | None = None  # an answer's text as the next turn sends it

    def load_at(self, rate_rps: float, setting: int = 0) -> list[SampledRequest]:
        """The requests at a rate; `setting` > 0 numbers the setting whose objectives they carry."""
        return make_requests(self.load_lengths, self.vocabulary, self._content_seed(rate_rps, setting))

    def conversations_at(self, rate_rps: float, setting: int = 0) -> list[Conversation]:
        assert self.conversation is not None
        return make_conversations(self.conversation, len(self.unit_arrivals_s), self.vocabulary, self.seed,
                                  self._content_seed(rate_rps, setting))

    def turns_per_arrival(self) -> float:
        """Requests each arrival makes: 1, or a conversation's turns on average (before any end early)."""
        if self.conversation is None:
            return 1.0
        return float(np.mean([len(c.messages) for c in self.conversations_at(1.0)]))

    def _content_seed(self, rate_rps: float, setting: int) -> list[int]:
        return [self.seed, 1, round(rate_rps * 1e6), *([setting] if setting else [])]


def build_requests(workload: AnyWorkload | ConversationWorkload, settings: ServeBenchSettings, tokenizer) -> Requests:
    vocab = word_token_ids(tokenizer)
    s, n, k = settings.seed, settings.requests_per_rate, settings.calibration_requests
    burstiness = settings.burstiness if settings.arrival == "gamma" else 1.0
    if isinstance(workload, ConversationWorkload):
        lengths = first_turn_lengths(make_conversations(workload, n, vocab, s, [s, 1]))
        cal_lengths = first_turn_lengths(make_conversations(workload, k, vocab, s + 1, [s, 2]))
    else:
        lengths = sample_lengths(workload, n, s, settings.max_model_len)
        cal_lengths = sample_lengths(workload, k, s + 1, settings.max_model_len)
    probe = [(settings.probe_prompt_tokens, 2)] * k
    probes = list(zip(make_requests(probe, vocab, [s, 3]), make_requests(probe, vocab, [s, 6]),
                      make_requests(probe, vocab, [s, 4]), make_requests(probe, vocab, [s, 7]), strict=True))
    conversation = workload if isinstance(workload, ConversationWorkload) else None
    return Requests(lengths, gamma_arrivals(1.0, n, burstiness, s), vocab, s, make_requests(cal_lengths, vocab, [s, 2]),
                    probes, make_requests(cal_lengths[:1], vocab, [s, 5])[0], conversation,
                    lambda text: tokenizer.encode(text, add_special_tokens=False))


class Runner:
    """Measures one target at a rate, once: later asks for the same rate reuse the run. With
    `objective`, every request carries that setting's objectives, and prompts of their own
    (`setting`, the setting's number from 1)."""

    def __init__(self, target: Target, requests: Requests, settings: ServeBenchSettings, progress: Progress | None,
                 objective: Objective | None = None, setting: int = 0):
        self.target, self.requests, self.settings, self.progress = target, requests, settings, progress
        self.objective, self.setting = objective, setting
        self.runs: dict[float, Run] = {}

    def run(self, rate_rps: float) -> Run | None:
        """The run at `rate_rps`; None when it was not measured and the run budget is spent."""
        rate_rps = round(rate_rps, 6)
        if rate_rps in self.runs:
            return self.runs[rate_rps]
        if len(self.runs) >= self.settings.max_runs:
            return None
        requests, url, model = self.requests, self.target.http_url, self.target.model
        arrivals_s = [t / rate_rps for t in requests.unit_arrivals_s]
        unit = "req/s" if requests.conversation is None else "conversations/s"
        sent = self.objective
        label = f"{self.target.name} @ {rate_rps:.3g} {unit}" + (f", objectives {sent.key}" if sent else "")
        objectives = (sent.ttft_ms, sent.tpot_ms) if sent else (None, None)
        report = (lambda done, total: self.progress(label, done, total)) if self.progress else None
        start = time.perf_counter()
        if requests.conversation is None:
            specs = [RequestSpec(t, r.prompt_token_ids, r.output_tokens, "load", *objectives, ignore_eos=True)
                     for t, r in zip(arrivals_s, requests.load_at(rate_rps, self.setting), strict=True)]
            results = asyncio.run(run_load(url, model, specs, self.settings.timeout_s, report))
        else:
            assert requests.encode is not None
            turns = asyncio.run(run_conversations(url, model, requests.conversations_at(rate_rps, self.setting),
                                                  arrivals_s, requests.encode, self.settings.max_model_len,
                                                  self.settings.timeout_s, report, objectives))
            specs, results = [spec for spec, _ in turns], [result for _, result in turns]
        run = Run(rate_rps, time.perf_counter() - start, specs, results, sent)
        self.runs[rate_rps] = run
        failed = sum(r.outcome != "ok" for r in results)
        log.info("%s: %d requests in %.1f s, %d not served", label, len(results), run.duration_s, failed)
        return run


@dataclass(frozen=True)
class Reference:
    """Set by the first configuration measured and shared by the rest, so all are judged by the
    same objectives and searched over the same rates."""

    objectives: dict  # ttft_ms, tpot_ms (scale 1) and the configuration they come from
    start_rps: float


def reference_from(calibration: dict, settings: ServeBenchSettings, source: str, lengths: list[tuple[int, int]],
                   turns_per_arrival: float = 1.0) -> Reference:
    """Objectives: the configured ones, else the unloaded p90s. Start rate: the configured one,
    else one request per unloaded end-to-end latency of a mean request (what one engine sustains
    without any batching; doubling from there finds the rest), divided by the requests each
    arrival makes (a conversation's turns)."""
    ttft = settings.reference_ttft_ms or calibration["ttft_ms"]["p90"]
    tpot = settings.reference_tpot_ms or calibration["tpot_ms"]["p90"]
    mean_out = float(np.mean([o for _, o in lengths]))
    e2e_ms = calibration["ttft_ms"]["p50"] + (mean_out - 1) * calibration["tpot_ms"]["p50"]
    return Reference({"ttft_ms": float(ttft), "tpot_ms": float(tpot), "from": source},
                     settings.start_rps or 1e3 / e2e_ms / turns_per_arrival)


def measure(target: Target, requests: Requests, settings: ServeBenchSettings, reference: Reference | None,
            progress: Progress | None) -> tuple[dict, Reference]:
    """Calibrate and run one target. Returns (its report section, the reference it was judged by)."""
    label = f"{target.name} calibration"
    calibration, unloaded = asyncio.run(engine_probe.calibrate(
        target.http_url, target.model, target.engines, requests.calibration, requests.probes, requests.warmup,
        settings.calibration_max_tokens, (lambda done, total: progress(label, done, total)) if progress else None,
        target.proxy_url))
    log.info("%s unloaded: %s", target.name, calibration)
    reference = reference or reference_from(calibration, settings, target.name, requests.load_lengths,
                                            requests.turns_per_arrival())
    judged = judged_objectives(settings, reference.objectives)
    shared = Runner(target, requests, settings, progress)
    runners = {o.key: Runner(target, requests, settings, progress, o, i) if settings.send_objectives else shared
               for i, o in enumerate(judged, start=1)}
    goodput: dict[str, dict] = {}
    if settings.rates_rps:
        for runner in dict.fromkeys(runners.values()):  # each runner once, in the settings' order
            for rate in settings.rates_rps:
                runner.run(rate)
    else:
        start = reference.start_rps
        for objective in judged:
            unloaded_attainment = attainment(unloaded, objective.ttft_ms, objective.tpot_ms)
            if unloaded_attainment < settings.target_attainment:
                log.info("%s: objectives %s are missed even unloaded (attainment %.2f): goodput 0 without runs",
                         target.name, objective.key, unloaded_attainment)
                goodput[objective.key] = {"goodput_rps": 0.0, "upper_rps": None, "probes": [],
                                          "unloaded_attainment": unloaded_attainment}
                continue

            def attained(rate: float, objective: Objective = objective) -> float | None:
                run = runners[objective.key].run(rate)
                return None if run is None else attainment(run.results, objective.ttft_ms, objective.tpot_ms)

            found = search_goodput(attained, start, target=settings.target_attainment, rel_tol=settings.rel_tol,
                                   min_rps=start / 4, max_probes=settings.max_runs)
            goodput[objective.key] = {**found.as_dict(), "unloaded_attainment": unloaded_attainment}
    runs = [run for runner in dict.fromkeys(runners.values()) for run in runner.runs.values()]
    section = serve_report.target_section(target, calibration, runs, judged, settings, goodput)
    return section, reference


def _describe_cluster(cfg, model_path: str) -> dict:
    return {"mode": cfg.mode, "model_path": model_path, "dtype": cfg.dtype, "max_model_len": cfg.max_model_len,
            "routing_policy": cfg.routing.policy, "prefix_aware": cfg.routing.prefix_aware, "on_unmeetable": cfg.slo.on_unmeetable,
            "pools": {role: pool.model_dump(mode="json") for role, pool in cfg.pools().items()}}


def bench_configs(cfg, model_path: str, modes: list[str], workloads: list[AnyWorkload | ConversationWorkload],
                  settings: ServeBenchSettings, progress: Progress | None = None) -> dict:
    """Deploy `cfg` in each configuration (`parse_configuration`) in turn on one Ray cluster (this
    process's, or a local one it starts) and measure each with the same requests of every
    workload. Returns the whole report: one workload's, or the sweep over several
    (`sweep_report`), each workload judged by objectives of its own."""
    from transformers import AutoTokenizer

    from pdserve.deployments import service
    from pdserve.prefill.engine import served_model_name

    settings = settings.model_copy(update={"max_model_len": cfg.max_model_len})
    # A seed per workload: the same seed would send the same words first, which the engines' prefix
    # caches would serve to the next workload's calibration and runs.
    own = {w.name: settings.model_copy(update={"seed": settings.seed + i}) for i, w in enumerate(workloads)}
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    requests = {w.name: build_requests(w, own[w.name], tokenizer) for w in workloads}
    configs: dict[str, dict[str, dict]] = {w.name: {} for w in workloads}
    reference: dict[str, Reference | None] = {w.name: None for w in workloads}
    svc = None
    try:
        for name in modes:
            mode, prefix_aware = parse_configuration(name)
            routing = cfg.routing if prefix_aware is None else cfg.routing.model_copy(update={"prefix_aware": prefix_aware})
            mode_cfg = cfg.model_copy(update={"mode": mode, "routing": routing,
                                              "slo": cfg.slo.model_copy(update={"on_unmeetable": "best_effort"})})
            if svc is None:
                svc = service.start(mode_cfg, model_path)
            else:
                svc.delete()
                svc = service.deploy(mode_cfg, model_path, svc.started_ray)
            log.info("benchmarking %s at %s", name, svc.fastest_http_url)
            engines = asyncio.run(engine_probe.find_engines(mode_cfg.app_name, mode, mode_cfg.kv_transfer.lease_ms))
            for w in workloads:
                label = name if len(workloads) == 1 else f"{name} {w.name}"
                target = Target(label, svc.fastest_http_url, served_model_name(mode_cfg, model_path), engines,
                                _describe_cluster(mode_cfg, model_path),
                                svc.http_url if svc.direct_http_url else None)
                configs[w.name][name], reference[w.name] = measure(target, requests[w.name], own[w.name],
                                                                   reference[w.name], progress)
    finally:
        if svc is not None:
            svc.stop()
    baseline = "colocated" if "colocated" in modes else None
    reports = {}
    for w in workloads:
        ref = reference[w.name]
        assert ref is not None
        reports[w.name] = serve_report.assemble(own[w.name], w, configs[w.name], ref.objectives, ref.start_rps,
                                                model_path, baseline)
    if len(workloads) == 1:
        return reports[workloads[0].name]
    return sweep_report.assemble(reports, baseline)


def bench_url(http_url: str, tokenizer_path: str, workload: AnyWorkload | ConversationWorkload, settings: ServeBenchSettings,
              progress: Progress | None = None) -> dict:
    """Measure a service that is already running (its own config unknown here: the added latency
    needs a handle on its engines, so it is left out)."""
    import httpx
    from transformers import AutoTokenizer

    models = httpx.get(http_url.rstrip("/") + "/v1/models", timeout=30.0).raise_for_status().json()["data"]
    if not models:
        raise RuntimeError(f"{http_url} serves no model")
    requests = build_requests(workload, settings, AutoTokenizer.from_pretrained(tokenizer_path))
    target = Target("service", http_url, models[0]["id"], [], {"http_url": http_url})
    section, reference = measure(target, requests, settings, None, progress)
    return serve_report.assemble(settings, workload, {"service": section}, reference.objectives, reference.start_rps,
                                 tokenizer_path, None)
