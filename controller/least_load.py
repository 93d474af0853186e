"""The baseline routing policy: the least-loaded prefill instance and the least-loaded
decode instance (or one colocated instance), blind to objectives. A pure function of
the pools' views."""

from __future__ import annotations

import numpy as np

from pdserve.controller.decision import Decision, Outcome, RouteRequest, Target
from pdserve.controller.pool_view import PoolView


def _least_loaded(pool: str, view: PoolView, live_after_s: float) -> Target | Decision:
    live = view.last_seen_s >= live_after_s
    if not live.any():
        return Decision(Outcome.UNAVAILABLE, reason=f"no live {pool} instance")
    open_ = live & (view.load < view.max_ongoing)
    if not open_.any():
        loads = ", ".join(f"{view.replica_ids[i]}={view.load[i]}/{view.max_ongoing[i]}" for i in np.flatnonzero(live))
        return Decision(Outcome.OVERLOADED, reason=f"every {pool} instance is full ({loads})")
    share = np.where(open_, view.load / view.max_ongoing, np.inf)
    best = int(np.argmin(share))
    return Target(view.replica_ids[best], view.kv_addrs[best], int(view.load[best]), view.pools[best],
                  int(view.tp_size[best]))


def choose_least_load(req: RouteRequest, prefill: PoolView | None, decode: PoolView, live_after_s: float) -> Decision:
    """Pick the least-loaded instance of each pool (load relative to capacity); `prefill`
    None means colocated. Instances that last reported before `live_after_s` are out."""
    d = _least_loaded("decode" if prefill is not None else "colocated", decode, live_after_s)
    if isinstance(d, Decision):
        return d
    if prefill is None:
        return Decision(Outcome.ROUTED, decode=d, reason=f"colocated {d.replica_id} load {d.load}")
    p = _least_loaded("prefill", prefill, live_after_s)
    if isinstance(p, Decision):
        return p
    return Decision(Outcome.ROUTED, p, d, reason=f"prefill {p.replica_id} load {p.load}, decode {d.replica_id} "
                    f"load {d.load}")
