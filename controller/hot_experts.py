"""Expert buffering, the controller's side: which experts each MoE layer of a pool keeps
pinned, and how well the pool's buffers do. Pure decisions over what replicas report.

Replicas report cumulative counters (`ExpertReport`); `ExpertWindow` turns them into the
pool's totals over the last `window_s` seconds (a replica whose counters go back, a restart,
starts over rather than subtracting), and `hot_set` picks the most used experts per layer.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace

log = logging.getLogger("pdserve.controller.experts")

Counts = list[list[int]]
"""counts[layer][expert]."""


@dataclass(frozen=True)
class ExpertReport:
    """A buffered replica's cumulative expert counters (since its buffers were installed)."""

    slots: int
    top_k: int
    hits: int
    misses: int
    bytes_moved: int
    stall_s: float
    tokens: int
    activations: Counts


def _delta(now: ExpertReport, before: ExpertReport | None) -> ExpertReport:
    """What `now` added since `before`, as a report of the difference (all of `now` when the
    replica started over: new shape, or counters that went back)."""
    shape_kept = before is not None and [len(r) for r in now.activations] == [len(r) for r in before.activations]
    if not shape_kept or now.tokens < before.tokens or now.hits + now.misses < before.hits + before.misses:
        return now
    acts = [[x - y for x, y in zip(a, b, strict=True)] for a, b in zip(now.activations, before.activations, strict=True)]
    return replace(now, hits=now.hits - before.hits, misses=now.misses - before.misses,
                   bytes_moved=now.bytes_moved - before.bytes_moved, stall_s=now.stall_s - before.stall_s,
                   tokens=now.tokens - before.tokens, activations=acts)


@dataclass
class ExpertWindow:
    """One pool's expert counters over a sliding window, from every replica's reports."""

    window_s: float
    _last: dict[str, ExpertReport] = field(default_factory=dict)
    _deltas: deque[tuple[float, ExpertReport]] = field(default_factory=deque)
    """(when, what a report added)."""

    def add(self, replica_id: str, report: ExpertReport, now_s: float) -> None:
        delta = _delta(report, self._last.get(replica_id))
        self._last[replica_id] = report
        if delta.tokens or delta.hits or delta.misses:
            self._deltas.append((now_s, delta))

    def forget(self, replica_id: str) -> None:
        self._last.pop(replica_id, None)

    def _expire(self, now_s: float) -> None:
        while self._deltas and self._deltas[0][0] < now_s - self.window_s:
            self._deltas.popleft()

    def counts(self, now_s: float) -> Counts:
        """Activations per layer and expert in the window, summed over the pool's replicas."""
        self._expire(now_s)
        total: Counts = []
        for _, d in self._deltas:
            if not total:
                total = [list(row) for row in d.activations]
            elif [len(r) for r in d.activations] == [len(r) for r in total]:
                total = [[x + y for x, y in zip(a, b, strict=True)] for a, b in zip(total, d.activations, strict=True)]
        return total

    def hot_size(self) -> int:
        """Experts pinned per layer in this pool (its smallest replica's budget decides)."""
        return min((hot_size(r.slots, r.top_k) for r in self._last.values()), default=0)

    def figures(self, now_s: float) -> dict[str, float]:
        """Hit rate, bytes moved and stall per token over the window (hit rate 1 when idle)."""
        self._expire(now_s)
        deltas = [d for _, d in self._deltas]
        hits = sum(d.hits for d in deltas)
        misses = sum(d.misses for d in deltas)
        tokens = sum(d.tokens for d in deltas)
        return {
            "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
            "bytes_moved_per_token": sum(d.bytes_moved for d in deltas) / tokens if tokens else 0.0,
            "stall_s_per_token": sum(d.stall_s for d in deltas) / tokens if tokens else 0.0,
            "tokens": tokens,
        }


def hot_size(slots: int, top_k: int) -> int:
    """Experts pinned per layer: the slots minus one token's experts, which stay free for misses."""
    return max(0, slots - top_k)


def hot_set(counts: Counts, size: int) -> list[list[int]]:
    """The `size` most activated experts of each layer (ties: the lower id), sorted by id."""
    hot = []
    for row in counts:
        ranked = sorted(range(len(row)), key=lambda e: (-row[e], e))
        hot.append(sorted(ranked[:max(0, size)]))
    return hot


def describe(counts: Counts, hot: list[list[int]]) -> str:
    """'layer 0: [1, 4, 9] 91% of 1200' per layer, for the decision log."""
    parts = []
    for i, (row, experts) in enumerate(zip(counts, hot, strict=True)):
        total = sum(row)
        share = sum(row[e] for e in experts) / total if total else 0.0
        parts.append(f"layer {i}: {experts} {share:.0%} of {total}")
    return "; ".join(parts)
