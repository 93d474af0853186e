"""The ingress's Prometheus metrics: what a platform team graphs and alerts on.

Latencies are measured where the client sees them (the ingress), per pool: TTFT
belongs to the pool that produced the first token (prefill, or colocated or adaptive),
TPOT and end-to-end latency to the pool that streamed the answer.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve.prefill.requests import SLOReport

GOODPUT_WINDOW_S = 60.0
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft_s = Histogram("pdserve_ttft_seconds", "Time to first token", ["pool"], buckets=_LATENCY_BUCKETS_S,
                                registry=r)
        self.tpot_s = Histogram("pdserve_tpot_seconds", "Mean time per output token after the first, per request",
                                ["pool"], buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("pdserve_e2e_latency_seconds", "Request latency, first byte in to last token out",
                               ["pool"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.requests = Counter("pdserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.route_calls = Counter("pdserve_route_calls", "Route calls to the controller, by path: its routing "
                                   "channel (socket) or Serve's handle", ["path"], registry=r)
        self.held_s = Histogram("pdserve_route_held_seconds", "How long requests were held before being routed "
                                "(best effort: until a pair could serve them within their objectives, or their TTFT "
                                "objective ran short)", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.replica_losses = Counter("pdserve_replica_losses", "Requests whose replica died, by phase and what followed",
                                      ["phase", "result"], registry=r)
        self.queue_depth = Gauge("pdserve_queue_depth", "Requests routed to an instance and not finished",
                                 ["pool", "replica"], registry=r)
        self.queued_prefill_tokens = Gauge("pdserve_queued_prefill_tokens", "Prompt tokens an instance has yet to "
                                           "prefill, as the controller counts them", ["pool", "replica"], registry=r)
        self.latency_correction = Gauge("pdserve_latency_correction", "The controller's observed / predicted latency "
                                        "factor per instance, phase (prefill, step) and part of the prediction "
                                        "(fixed, per_token)", ["pool", "replica", "phase", "part"], registry=r)
        self.live_instances = Gauge("pdserve_live_instances", "Instances reporting to the controller", ["pool"],
                                    registry=r)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved from prefill to decode", registry=r)
        self.kv_transfers = Counter("pdserve_kv_transfers", "KV transfers by final state", ["state"], registry=r)
        self.slo_met = Counter("pdserve_slo_met_requests",
                               "Requests that met both their TTFT and TPOT objectives (rate() is goodput)", registry=r)
        self.slo_missed = Counter("pdserve_slo_missed_requests", "Requests that missed an objective, by objective",
                                  ["objective"], registry=r)
        self.goodput_rps = Gauge("pdserve_goodput_rps",
                                 f"Requests per second that met both objectives, over the last {GOODPUT_WINDOW_S:.0f} s",
                                 registry=r)
        self._met_at_s: deque[float] = deque()
        self.goodput_rps.set_function(self._goodput)
        self.kv_exposed_s = Histogram("pdserve_kv_transfer_exposed_seconds",
                                      "KV transfer time not hidden behind prefill compute",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                                      registry=r)

        self.expert_hit_rate = Gauge("pdserve_expert_hit_rate", "Share of the experts steps needed that were "
                                     "resident already, per buffered pool, over the controller's window", ["pool"],
                                     registry=r)
        self.expert_bytes_per_token = Gauge("pdserve_expert_bytes_moved_per_token", "Expert bytes copied "
                                            "host-to-device per token, per buffered pool", ["pool"], registry=r)
        self.expert_stall_per_token = Gauge("pdserve_expert_stall_seconds_per_token", "Time layers waited for "
                                            "expert copies per token, per buffered pool", ["pool"], registry=r)
        self.autoscale_replicas = Gauge("pdserve_autoscale_desired_replicas",
                                        "Replicas the autoscaler sized each pool to", ["pool"], registry=r)
        self.autoscale_needed = Gauge("pdserve_autoscale_needed_replicas",
                                      "Replicas demand asks for, before delays, step limits and the GPU budget",
                                      ["pool"], registry=r)
        self.autoscale_demand = Gauge("pdserve_autoscale_demand",
                                      "Demand the pool is sized for: prompt tokens/s (prefill), sequences (decode)",
                                      ["pool"], registry=r)
        self.autoscale_capacity = Gauge("pdserve_autoscale_capacity_per_replica",
                                        "What one replica serves at its objective, in the demand's unit", ["pool"],
                                        registry=r)
        self.autoscale_correction = Gauge("pdserve_autoscale_latency_correction",
                                          "Measured / predicted latency applied to the pool's profile", ["pool"],
                                          registry=r)
        self.autoscale_gpus = Gauge("pdserve_autoscale_gpus", "GPUs the sized pools hold", registry=r)
        self.autoscale_cost = Gauge("pdserve_autoscale_cost_per_hour", "Cost per hour of the sized pools", registry=r)

    def observe_autoscale(self, status: dict | None) -> None:
        """The controller's last sizing decision (`Controller.autoscale_status`)."""
        if status is None:
            return
        for pool in ("prefill", "decode"):
            d = status[pool]
            self.autoscale_replicas.labels(pool).set(d["replicas"])
            self.autoscale_needed.labels(pool).set(d["needed"])
            self.autoscale_demand.labels(pool).set(d["demand"])
            self.autoscale_capacity.labels(pool).set(d["capacity_per_replica"])
            self.autoscale_correction.labels(pool).set(d["correction"])
        self.autoscale_gpus.set(status["gpus"])
        self.autoscale_cost.set(status["cost_per_hour"])

    def observe_experts(self, status: dict[str, dict]) -> None:
        """The buffered pools' figures (`Controller.expert_status`)."""
        for pool, figures in status.items():
            self.expert_hit_rate.labels(pool).set(figures["hit_rate"])
            self.expert_bytes_per_token.labels(pool).set(figures["bytes_moved_per_token"])
            self.expert_stall_per_token.labels(pool).set(figures["stall_s_per_token"])

    def observe_instances(self, snapshot: list[dict]) -> None:
        for gauge in (self.queue_depth, self.queued_prefill_tokens, self.latency_correction):
            gauge.clear()
        live: dict[str, int] = {}
        for inst in snapshot:
            self.queue_depth.labels(inst["pool"], inst["replica_id"]).set(inst["load"])
            self.queued_prefill_tokens.labels(inst["pool"], inst["replica_id"]).set(inst["queued_prefill_tokens"])
            for phase in ("prefill", "step"):
                for part, factor in inst[f"{phase}_correction"].items():
                    self.latency_correction.labels(inst["pool"], inst["replica_id"], phase, part).set(factor)
            live[inst["pool"]] = live.get(inst["pool"], 0) + int(inst["live"])
        for pool, n in live.items():
            self.live_instances.labels(pool).set(n)

    def observe_kv(self, report: dict) -> None:
        state = str(report.get("state", "UNKNOWN"))
        self.kv_transfers.labels(state).inc()
        if state == "DONE":
            self.kv_bytes.inc(int(report.get("bytes", 0)))
            self.kv_exposed_s.observe(float(report.get("exposed_ms", 0.0)) / 1e3)

    def observe_slo(self, report: SLOReport) -> None:
        if report.ttft_met and report.tpot_met:
            self.slo_met.inc()
            self._met_at_s.append(time.monotonic())
            self._forget_older_than_window()
        if not report.ttft_met:
            self.slo_missed.labels("ttft").inc()
        if not report.tpot_met:
            self.slo_missed.labels("tpot").inc()

    def _goodput(self) -> float:
        self._forget_older_than_window()
        return len(self._met_at_s) / GOODPUT_WINDOW_S

    def _forget_older_than_window(self) -> None:
        """Also run on every observation, so the window stays bounded when nobody scrapes."""
        horizon = time.monotonic() - GOODPUT_WINDOW_S
        while self._met_at_s and self._met_at_s[0] < horizon:
            self._met_at_s.popleft()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
