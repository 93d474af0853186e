"""First routing policy: the least-loaded prefill instance and the least-loaded
decode instance (or one colocated instance). A pure function of the live instances;
the SLO-aware policy replaces it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pdserve.controller.registry import Instance


class Outcome(Enum):
    ROUTED = "routed"
    OVERLOADED = "overloaded"  # every instance of a pool is full: retry later
    UNAVAILABLE = "unavailable"  # a pool has no live instance


@dataclass(frozen=True)
class Target:
    replica_id: str
    kv_addr: str
    load: int


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    prefill: Target | None = None
    """None in colocated mode: the decode target does both phases."""
    decode: Target | None = None
    reason: str = ""

    def targets(self) -> list[Target]:
        return [t for t in (self.prefill, self.decode) if t is not None]


def _least_loaded(pool: str, instances: list[Instance]) -> Target | Decision:
    if not instances:
        return Decision(Outcome.UNAVAILABLE, reason=f"no live {pool} instance")
    free = [i for i in instances if not i.full]
    if not free:
        loads = ", ".join(f"{i.replica_id}={i.load}/{i.report.max_ongoing}" for i in instances)
        return Decision(Outcome.OVERLOADED, reason=f"every {pool} instance is full ({loads})")
    best = min(free, key=lambda i: (i.load / i.report.max_ongoing, i.load, i.replica_id))
    return Target(best.replica_id, best.report.kv_addr, best.load)


def choose_pair(prefill: list[Instance] | None, decode: list[Instance]) -> Decision:
    """Pick the least-loaded instance of each pool; `prefill` None means colocated."""
    d = _least_loaded("decode" if prefill is not None else "colocated", decode)
    if isinstance(d, Decision):
        return d
    if prefill is None:
        return Decision(Outcome.ROUTED, decode=d, reason=f"colocated {d.replica_id} load {d.load}")
    p = _least_loaded("prefill", prefill)
    if isinstance(p, Decision):
        return p
    return Decision(Outcome.ROUTED, p, d, reason=f"prefill {p.replica_id} load {p.load}, decode {d.replica_id} load {d.load}")
