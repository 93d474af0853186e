"""The ingress's own view of which instances are live, per pool: what `/health` answers from, so
that probes cost the controller nothing while the view is fresh. Pure bookkeeping over snapshots
the caller fetches."""

from __future__ import annotations

from collections.abc import Iterable

from pdserve.config.cluster import pool_role

STALE_POLLS = 5
"""The view is trusted at most this many poll intervals after its snapshot."""


class InstanceView:
    def __init__(self, pools: Iterable[str]):
        self.pools = list(pools)
        self.poll_interval_s = 1.0
        self.live: dict[str, int] | None = None
        """Live instances per pool in the last snapshot; None before the first."""
        self.live_ids: set[str] = set()
        """The live instances' replica ids in the last snapshot."""
        self.seen_live: set[str] = set()
        """Every replica id any snapshot showed live (ids are never reused)."""
        self._seen_at_s = 0.0
        self._refreshed_at_s = -float("inf")

    def observe(self, snapshot: list[dict], now_s: float) -> None:
        live = dict.fromkeys(self.pools, 0)
        for inst in snapshot:
            if inst["live"] and inst["pool"] in live:
                live[inst["pool"]] += 1
        self.live, self._seen_at_s = live, now_s
        self.live_ids = {inst["replica_id"] for inst in snapshot if inst["live"] and "replica_id" in inst}
        self.seen_live |= self.live_ids

    def serves(self) -> bool:
        """Whether the last snapshot had a live instance for every role: prefill and decode, one
        colocated, or one of any adaptive pool (each can prefill and decode)."""
        if not self.live:
            return False
        roles: dict[str, int] = {}
        for pool, n in self.live.items():
            roles[pool_role(pool)] = roles.get(pool_role(pool), 0) + n
        return all(roles.values())

    def gone(self, replica_id: str, now_s: float) -> bool:
        """Whether a fresh view says `replica_id`, once seen live, is live no more. A replica this
        view never saw live says nothing (the controller may have routed to it before this view's
        next snapshot), nor does a stale view."""
        return self.fresh(now_s) and replica_id in self.seen_live and replica_id not in self.live_ids

    def fresh(self, now_s: float) -> bool:
        return self.live is not None and now_s - self._seen_at_s <= STALE_POLLS * self.poll_interval_s

    def refresh_due(self, now_s: float) -> bool:
        """Whether a caller should fetch a snapshot itself now: the view is stale and nobody fetched
        one within a poll interval (so probes cost at most one call an interval, however many come).
        True also records the fetch."""
        if self.fresh(now_s) or now_s - self._refreshed_at_s < self.poll_interval_s:
            return False
        self._refreshed_at_s = now_s
        return True
