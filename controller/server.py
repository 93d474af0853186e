"""The controller as a Ray Serve deployment (one replica): it keeps the registry
and answers routing decisions; engine replicas report to it, ingresses ask it."""

from __future__ import annotations

import logging
import time

from pdserve.controller.least_load import Decision, Outcome, choose_pair
from pdserve.controller.registry import Instance, LoadReport, Registry

log = logging.getLogger("pdserve.controller")


class Controller:
    def __init__(self, mode: str, ttl_s: float = 3.0):
        self.colocated = mode == "colocated"
        self.registry = Registry(ttl_s=ttl_s)

    def report(self, r: LoadReport) -> None:
        now = time.monotonic()
        self.registry.report(r, now)
        self.registry.forget_stale(now)

    def choose(self, request_id: str, prompt_tokens: int) -> Decision:
        now = time.monotonic()
        live = self.registry.live
        if self.colocated:
            decision = choose_pair(None, live("colocated", now))
        else:
            decision = choose_pair(live("prefill", now), live("decode", now))
        if decision.outcome is Outcome.ROUTED:
            for t in decision.targets():
                self.registry.assign(t.replica_id)
        log.info("route %s (%d prompt tokens): %s, %s", request_id, prompt_tokens, decision.outcome.value,
                 decision.reason)
        return decision

    def release(self, replica_ids: list[str]) -> None:
        for rid in replica_ids:
            self.registry.release(rid)

    def snapshot(self) -> list[dict]:
        """Every known instance with its load and liveness, for health and metrics."""
        now = time.monotonic()
        return [_describe(i, now, self.registry.ttl_s) for i in self.registry.instances.values()]


def _describe(i: Instance, now_s: float, ttl_s: float) -> dict:
    return {
        "replica_id": i.replica_id,
        "pool": i.report.pool,
        "node_id": i.report.node_id,
        "accelerator_type": i.report.accelerator_type,
        "load": i.load,
        "running": i.report.running,
        "max_ongoing": i.report.max_ongoing,
        "live": now_s - i.last_seen_s <= ttl_s,
    }
