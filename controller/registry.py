"""The controller's view of the live engine instances, fed by their load reports.

Each engine replica reports every `report_interval_s`; an instance that misses
reports for `ttl_s` is taken out of routing and comes back with its next report.
Load is the count of requests the controller routed to an instance and has not yet
seen released (`assigned`): exact at once, where a reported count lags by up to a
report interval (an idle instance would look busy, a busy one idle). An instance the
controller first hears of (a new replica, or every replica after a controller
restart) starts from the running count it reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReport:
    """What an engine replica tells the controller about itself."""

    replica_id: str
    """Ray Serve replica id (unique within the application)."""
    pool: str
    """"prefill", "decode" or "colocated"."""
    node_id: str
    accelerator_type: str | None
    kv_addr: str
    """host:port of the decode replica's KV receiver; empty for other pools."""
    max_ongoing: int
    """Requests the replica runs at once."""
    running: int
    """Requests the replica is serving now."""
    started_at_s: float
    """Wall time the replica started: a new value is a new incarnation."""


@dataclass
class Instance:
    report: LoadReport
    last_seen_s: float
    assigned: int = 0
    """Requests routed here by the controller and not yet released."""

    @property
    def replica_id(self) -> str:
        return self.report.replica_id

    @property
    def load(self) -> int:
        return self.assigned

    @property
    def full(self) -> bool:
        return self.load >= self.report.max_ongoing


@dataclass
class Registry:
    ttl_s: float = 3.0
    """Missed-report time after which an instance stops receiving requests."""
    instances: dict[str, Instance] = field(default_factory=dict)

    def report(self, r: LoadReport, now_s: float) -> None:
        inst = self.instances.get(r.replica_id)
        if inst is None or inst.report.started_at_s != r.started_at_s:
            log.info("instance %s joined pool %s (node %s, accelerator %s, kv %s)",
                     r.replica_id, r.pool, r.node_id[:8], r.accelerator_type, r.kv_addr or "-")
            self.instances[r.replica_id] = Instance(r, now_s, assigned=r.running)
            return
        if now_s - inst.last_seen_s > self.ttl_s:
            log.info("instance %s is reporting again after %.1f s", r.replica_id, now_s - inst.last_seen_s)
        inst.report, inst.last_seen_s = r, now_s

    def live(self, pool: str, now_s: float) -> list[Instance]:
        return [i for i in self.instances.values() if i.report.pool == pool and now_s - i.last_seen_s <= self.ttl_s]

    def assign(self, replica_id: str) -> None:
        if (inst := self.instances.get(replica_id)) is not None:
            inst.assigned += 1

    def release(self, replica_id: str) -> None:
        if (inst := self.instances.get(replica_id)) is not None and inst.assigned > 0:
            inst.assigned -= 1

    def forget_stale(self, now_s: float, after_s: float = 60.0) -> None:
        """Drop instances silent for `after_s`: their replicas are gone for good."""
        for rid in [rid for rid, i in self.instances.items() if now_s - i.last_seen_s > after_s]:
            log.info("instance %s removed after %.0f s without reports", rid, now_s - self.instances[rid].last_seen_s)
            del self.instances[rid]
