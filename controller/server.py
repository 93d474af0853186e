"""The controller as a Ray Serve deployment (one replica): it keeps the registry and
answers routing decisions; engine replicas report to it, ingresses ask it and tell it
how each request went (prefill time, TPOT), which corrects its latency models. With an
autoscaling policy it also sizes both pools from what it sees."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import numpy as np

from pdserve import telemetry
from pdserve.config.autoscaling import AutoscalingConfig
from pdserve.config.autoscaling_policy import AutoscalingPolicy
from pdserve.config.routing import RoutingConfig
from pdserve.controller.admission import KindWaits, Room, Starved
from pdserve.controller.autoscaling.loop import Autoscaler, RateWindow, describe
from pdserve.controller.decision import Decision, Outcome, RouteRequest
from pdserve.controller.hot_experts import ExpertWindow, hot_set
from pdserve.controller.hot_experts import describe as describe_hot
from pdserve.controller.instance import Instance, LoadReport
from pdserve.controller.latency_model import Correction
from pdserve.controller.least_load import choose_least_load
from pdserve.controller.pool_view import PoolView
from pdserve.controller.registry import Registry
from pdserve.controller.route_server import RouteServer
from pdserve.controller.sessions import Sessions
from pdserve.controller.slo_router import choose_slo, priority_headroom

log = logging.getLogger("pdserve.controller")

INGRESS_WATCH_S = 5.0
"""How often the controller asks Serve which ingress replicas run, to drop the bookings of gone ones."""

PROBE_WITHIN = 4.0
"""A probe is a request predicted to miss its objectives by at most this factor, a miss that
stale predictions can explain; one further off (a 0.01 ms TPOT) is out of reach anyway."""


class Controller:
    """Its methods that touch the registry are coroutines without awaits: Serve runs them one at a
    time on the replica's event loop, and so does the routing channel (`route_server.py`), so the
    registry needs no lock (sync methods would run in a thread pool)."""

    def __init__(self, mode: str, routing: RoutingConfig, kv_bytes_per_token: int, best_effort: bool = False,
                 log_level: str = "INFO", app_name: str = "pdserve",
                 autoscaling: tuple[AutoscalingConfig, AutoscalingPolicy] | None = None,
                 expert_windows_s: dict[str, float] | None = None, route_secret: str = ""):
        telemetry.setup_logging(log_level)
        self.mode = mode
        self.routing = routing
        self.kv_bytes_per_token = kv_bytes_per_token
        self.best_effort = best_effort
        self.registry = Registry(routing.profiles, ttl_s=routing.ttl_s, kv_reserve_tokens=routing.kv_reserve_tokens,
                                 tpot_amortize_max_tokens=routing.tpot_amortize_max_tokens)
        log.info("controller: %s routing, %s when objectives cannot be met, %d KV bytes per token",
                 routing.policy, "best effort" if best_effort else "reject", kv_bytes_per_token)
        self.window = RateWindow(autoscaling[1].window_s, time.monotonic()) if autoscaling else None
        """Arrivals and completions, kept only for the autoscaler."""
        self.autoscaler = _autoscaler(app_name, *autoscaling) if autoscaling else None
        self._autoscaling: asyncio.Task | None = None
        self.expert_windows_s = expert_windows_s or {}
        """Per buffered pool, the window its hot set is computed over."""
        self.experts: dict[str, ExpertWindow] = {}
        """Buffered pools' expert counters, by pool."""
        self.hot: dict[str, list[list[int]]] = {}
        """The hot set last computed per pool."""
        self.engine_metrics_text: dict[str, str] = {}
        """Each engine replica's last pushed Prometheus exposition (its `vllm:*` metrics), by replica id."""
        self.app_name = app_name
        self._ingress_watch: asyncio.Task | None = None
        self._routed_at_s = time.monotonic()
        """When a request was last routed: long ago with requests arriving, predictions need a probe."""
        self.sessions = Sessions()
        """Where each conversation's latest turn went."""
        self.waits = KindWaits(routing.fair_admission)
        """How long each prompt-length kind has gone refused with none admitted."""
        self._room_kept: tuple[str, str, bool] | None = None
        """The last room logged (kind, instance, unmeetable): the log says when it changes."""
        self._route_secret = route_secret
        self._route_server: asyncio.Task | None = None
        """The routing channel's start (`route_server.py`), begun on the first ask for its address."""

    def _start_autoscaling(self) -> None:
        """On the replica's event loop, which the first call runs on (the constructor may not);
        so is the watch on the ingress replicas."""
        if self.autoscaler is not None and self._autoscaling is None:
            self._autoscaling = asyncio.get_running_loop().create_task(
                self.autoscaler.run(self.registry, self.window, time.monotonic))
        if self._ingress_watch is None:
            self._ingress_watch = asyncio.get_running_loop().create_task(self._watch_ingresses())

    async def _watch_ingresses(self) -> None:
        """Drop the bookings of ingress replicas Serve no longer runs (a killed or crashed ingress
        releases nothing), asking Serve every `INGRESS_WATCH_S`."""
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        while True:
            await asyncio.sleep(INGRESS_WATCH_S)
            try:
                as_of = time.monotonic()
                serve_controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
                details = await serve_controller.get_serve_instance_details.remote()
                replicas = details["applications"][self.app_name]["deployments"]["ingress"]["replicas"]
            except Exception as exc:  # Serve is away or the application is changing: ask again later
                log.warning("could not list the ingress replicas: %r", exc)
                continue
            self.registry.keep_owners({r["replica_id"] for r in replicas if r["state"] != "STOPPED"}, as_of)

    async def route_address(self) -> str:
        """Where the routing channel listens, for the ingresses ("" when it is off or could not
        start: they route through Serve's handle). Started on the first ask, on the replica's event loop."""
        if not self._route_secret:
            return ""
        if self._route_server is None:
            import ray

            server = RouteServer(self.choose, self._route_secret)
            self._route_server = asyncio.ensure_future(server.start(ray.util.get_node_ip_address()))
        try:
            return await asyncio.shield(self._route_server)
        except OSError as exc:
            log.warning("routing channel could not start: %r", exc)
            self._route_server = None
            return ""

    async def report(self, r: LoadReport) -> list[list[int]] | None:
        """Takes a replica's load; answers a buffered replica with its pool's hot set (experts
        to keep pinned, per MoE layer), None to others."""
        self._start_autoscaling()
        now = time.monotonic()
        self.registry.report(r, now)
        self.registry.forget_stale(now)
        self.registry.expire(now)
        if r.experts is None:
            return None
        window = self.experts.setdefault(r.pool, ExpertWindow(self.expert_windows_s.get(r.pool, 60.0)))
        window.add(r.replica_id, r.experts, now)
        counts = window.counts(now)
        hot = hot_set(counts, window.hot_size())
        if hot != self.hot.get(r.pool):
            self.hot[r.pool] = hot
            log.info("experts %s: hot set of %d per layer from %s", r.pool, window.hot_size(), describe_hot(counts, hot))
        return hot

    async def choose(self, req: RouteRequest, resuming: bool = False) -> Decision:
        """`resuming`: the request lost its replica while streaming to its client; it is served
        on the best route even when predicted to miss its objectives, since refusing it now
        would throw away the answer already sent."""
        now = time.monotonic()
        live_after = now - self.registry.ttl_s
        view = self.registry.view
        if self.mode == "adaptive":  # one pool, every instance prefilling and decoding
            decode_pool = "adaptive"
            prefill_pool = decode_pool if self.routing.policy == "slo" else None
        else:
            prefill_pool = None if self.mode == "colocated" else "prefill"
            decode_pool = "colocated" if self.mode == "colocated" else "decode"
        decode = view(decode_pool)
        prefill = None if prefill_pool is None else decode if prefill_pool == decode_pool else view(prefill_pool)
        if self.routing.policy == "least_load":
            decision = choose_least_load(req, prefill, decode, live_after)
        else:
            decision = self._choose_slo(req, prefill, decode, (prefill_pool, decode_pool), live_after, now, resuming)
            if not resuming:
                if decision.outcome is Outcome.ROUTED:
                    self.waits.admitted(req)
                elif decision.outcome in (Outcome.REJECTED, Outcome.OVERLOADED):
                    self.waits.refused(req, now)
        if decision.outcome is Outcome.ROUTED:
            self._routed_at_s = now
            self.registry.assign(req, decision, now)
            self.sessions.remember(req.session_id, req.prefix_hashes, [t.replica_id for t in decision.targets()], now)
            if self.window is not None:
                self.window.arrived(now, req.prompt_tokens)
        if decision.outcome is not Outcome.HELD or not req.held_ms:  # a hold is logged once, and how it ended
            log.info("route %s (%d prompt tokens, ttft %.0f ms, tpot %.0f ms, priority %d): %s, %s", req.request_id,
                     req.prompt_tokens, req.slo.ttft_ms, req.slo.tpot_ms, req.slo.priority, decision.outcome.value,
                     decision.reason)
        return decision

    def _choose_slo(self, req: RouteRequest, prefill: PoolView | None, decode: PoolView,
                    pools: tuple[str | None, str], live_after: float, now: float, resuming: bool) -> Decision:
        """`choose_slo`, with a probe after a long spell of refusals, and room kept for a starved kind."""
        cached = self._cached(*pools, req, now)
        # An answer already streaming is not held: its client would see its tokens stop.
        decision = choose_slo(req, prefill, decode, live_after, self.routing, self.kv_bytes_per_token,
                              self.best_effort or resuming, hold=not resuming, **cached)
        idle_s = now - self._routed_at_s
        if (decision.outcome is Outcome.REJECTED and 0 < self.routing.probe_after_s <= idle_s
                and decision.predicted_ttft_ms <= PROBE_WITHIN * req.slo.ttft_ms
                and decision.predicted_tpot_ms <= PROBE_WITHIN * req.slo.tpot_ms):
            probe = choose_slo(req, prefill, decode, live_after, self.routing, self.kv_bytes_per_token, True,
                               **cached)
            return replace(probe, reason=f"probe after {idle_s:.1f} s with nothing routed; {decision.reason}; "
                                         f"{probe.reason}")
        starved = None if resuming else self.waits.starved(now)
        if (starved is None or decision.outcome is not Outcome.ROUTED
                or starved.kind == self.waits.kind(req.prompt_tokens)):
            return decision
        room = self._room(starved, prefill, decode, pools, live_after, now)
        if room is None or room.left_by(decision):
            return decision
        # Another instance, or none: the views without the one whose room is kept.
        pool, slot = self.registry.placement(room.replica_id)
        if pool == pools[1]:  # the decoding view's: colocated, adaptive, or a local prefill
            decode = decode.closed(slot)
            prefill = decode if pools[0] == pools[1] else prefill
        else:
            prefill = prefill.closed(slot)
        elsewhere = choose_slo(req, prefill, decode, live_after, self.routing, self.kv_bytes_per_token,
                               self.best_effort, hold=True, **cached)
        return replace(elsewhere, reason=f"{room.describe()}; {elsewhere.reason}")

    def _room(self, starved: Starved, prefill: PoolView | None, decode: PoolView, pools: tuple[str | None, str],
              live_after: float, now: float) -> Room | None:
        """Where the starved kind's latest refused request would be prefilled soonest, and what it
        needs there; None when no instance could take it, or not even an idle one would meet its
        TTFT objective (keeping room would then serve nothing)."""
        waiting = starved.request
        d = choose_slo(waiting, prefill, decode, live_after, self.routing, self.kv_bytes_per_token, True,
                       **self._cached(*pools, waiting, now))
        target = d.prefill or d.decode
        if d.outcome is not Outcome.ROUTED or target is None:
            return None
        pool, slot = self.registry.placement(target.replica_id)
        view = self.registry.view(pool)
        prompt_ms = float(view.prefill_ms_per_token[slot]) * (waiting.prompt_tokens - d.cached_tokens)
        limit_ms = waiting.slo.ttft_ms * priority_headroom(waiting.slo.priority, self.routing)
        room = Room(starved.kind, starved.waited_s, target.replica_id, prompt_ms, limit_ms)
        unmeetable = float(view.prefill_fixed_ms[slot]) + prompt_ms > limit_ms
        if (room.kind, room.replica_id, unmeetable) != self._room_kept:
            self._room_kept = (room.kind, room.replica_id, unmeetable)
            log.info("admission: %s-token prompts refused for %.1f s with none admitted: %s", room.kind,
                     room.waited_s, "not even an idle instance would meet their TTFT objective, no room kept"
                     if unmeetable else f"{room.describe()} (its predicted ttft now {d.predicted_ttft_ms:.0f} ms)")
        return None if unmeetable else room

    def _cached(self, prefill_pool: str | None, decode_pool: str, req: RouteRequest,
                now_s: float) -> dict[str, np.ndarray]:
        """`choose_slo`'s per-instance counts of the prompt's leading tokens each pool's prefix
        caches hold, from the index or, where more, from the session's previous turn ({}: no
        prompt hashes, or prefix-aware routing off)."""
        if not req.prefix_hashes or not self.routing.prefix_aware:
            return {}
        pools = (decode_pool,) if prefill_pool in (None, decode_pool) else (decode_pool, prefill_pool)
        cached = self.registry.cached_tokens(pools, req.prefix_hashes)
        replica_ids, held = self.sessions.held(req.session_id, req.prefix_hashes, now_s)
        for replica_id in replica_ids:
            pool, slot = self.registry.placement(replica_id)
            if pool in cached:
                cached[pool][slot] = max(cached[pool][slot], held)
        found = {"decode_cached": cached[decode_pool]}
        if prefill_pool is not None:
            found["prefill_cached"] = cached[prefill_pool]
        return found

    async def replica_lost(self, replica_id: str, departed: bool = True) -> None:
        """An ingress found this replica gone: stop routing to it now. `departed`: for good (its
        actor died, or it is draining before Serve stops it, still reporting while its streams
        finish); otherwise a replica that reports again comes back."""
        if departed:
            self.registry.forget(replica_id, "it left the running replicas", time.monotonic())
        else:
            self.registry.forget(replica_id, "its router has not seen it")
        for window in self.experts.values():
            window.forget(replica_id)

    async def expert_status(self) -> dict[str, dict]:
        """Per buffered pool, over its window: hit rate, bytes moved and stall per token, hot set."""
        now = time.monotonic()
        return {pool: {**w.figures(now), "hot": self.hot.get(pool, [])} for pool, w in self.experts.items()}

    async def prefill_done(self, request_id: str, prefill_ms: float) -> None:
        self.registry.prefill_done(request_id, prefill_ms, time.monotonic())

    async def release(self, request_id: str, tpot_ms: float | None = None, output_tokens: int = 0) -> None:
        self.registry.release(request_id, tpot_ms)
        if output_tokens and self.window is not None:
            self.window.finished(time.monotonic(), output_tokens)

    async def autoscale_status(self) -> dict | None:
        """The last sizing decision with its operands, for metrics; None without a policy or before the first."""
        return describe(self.autoscaler.last) if self.autoscaler and self.autoscaler.last else None

    async def push_engine_metrics(self, replica_id: str, text: str) -> None:
        """An engine replica's Prometheus exposition, pushed every few seconds: kept here so that a
        /metrics scrape asks the controller once instead of every engine replica's request slots."""
        self.engine_metrics_text[replica_id] = text

    async def engine_metrics(self) -> dict[tuple[str, str], str]:
        """The last exposition of each live engine replica, by (pool, replica id); those of
        replicas no longer live are dropped."""
        now = time.monotonic()
        live = {rid: i.report.pool for rid, i in self.registry.instances.items()
                if now - i.last_seen_s <= self.registry.ttl_s}
        for rid in set(self.engine_metrics_text) - set(live):
            del self.engine_metrics_text[rid]
        return {(live[rid], rid): text for rid, text in self.engine_metrics_text.items()}

    async def snapshot(self) -> list[dict]:
        """Every known instance with its load, liveness and latency corrections, for health and metrics."""
        now = time.monotonic()
        return [_describe(i, now, self.registry.ttl_s) for i in self.registry.instances.values()]


def _autoscaler(app_name: str, cfg: AutoscalingConfig, policy: AutoscalingPolicy) -> Autoscaler:
    from pdserve.controller.autoscaling.serve_actuator import ServeActuator

    actuators = [ServeActuator(app_name)]
    if cfg.kubernetes is not None:
        from pdserve.controller.autoscaling.k8s_actuator import KubernetesActuator

        actuators.append(KubernetesActuator(cfg.kubernetes))
    log.info("autoscaling every %.0f s: prefill %d-%d replicas for ttft %.0f ms, decode %d-%d for tpot %.0f ms, "
             "GPU budget %s, actuators %s", policy.interval_s, policy.prefill.min_replicas, policy.prefill.max_replicas,
             policy.prefill.ttft_ms, policy.decode.min_replicas, policy.decode.max_replicas, policy.decode.tpot_ms,
             policy.gpu_budget, [type(a).__name__ for a in actuators])
    return Autoscaler(policy, actuators)


def _factors(c: Correction) -> dict[str, float]:
    return {"fixed": c.fixed, "per_token": c.per_token}


def _describe(i: Instance, now_s: float, ttl_s: float) -> dict:
    r = i.report
    return {
        "replica_id": i.replica_id,
        "pool": r.pool,
        "node_id": r.node_id,
        "accelerator_type": r.accelerator_type,
        "load": i.load,
        "running": r.running,
        "waiting": r.waiting,
        "max_ongoing": r.max_ongoing,
        "queued_prefill_tokens": i.queued_prefill_tokens(),
        "free_kv_blocks": r.free_kv_blocks,
        "total_kv_blocks": r.total_kv_blocks,
        "recent_ttft_ms": r.recent_ttft_ms,
        "recent_tpot_ms": r.recent_tpot_ms,
        "prefill_correction": _factors(i.prefill_fix.current),
        "step_correction": _factors(i.step_fix.current),
        "live": now_s - i.last_seen_s <= ttl_s,
    }
