"""A pool's instances as columns (one row per instance), so that a routing decision over
a thousand instances is a handful of vectorized operations, not a Python loop.

The registry keeps one view per pool and rewrites an instance's row whenever its state
changes (a report, an assignment, a release); the routers only read views. Rows are
grouped by node, so the fastest instance of every node is one `reduceat`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class Row:
    replica_id: str
    kv_addr: str
    pool: str
    """Its pool (Serve deployment): one view may hold several (adaptive mode's pools)."""
    step_base_ms: float
    """Predicted decode step with one more sequence, before that sequence's own context."""
    step_ms_per_token: float
    """Step time per context token of the new sequence."""
    prefill_base_ms: float
    """Predicted time to prefill what is queued there, before a new prompt."""
    prefill_ms_per_token: float
    prefill_fixed_ms: float
    """The fixed cost of one prefill (the profile's base, corrected), without the queue."""
    last_seen_s: float
    """When the instance last reported (the controller's monotonic clock)."""
    tpot_floor_ms: float
    """Tightest TPOT objective among the requests running there (inf: none)."""
    tpot_slack_ms: float
    """Least stall any of the answers decoding there can still absorb within its TPOT objective,
    over its tokens (inf: none decoding; at most 0: none)."""
    queued_stall_ms: float
    """The compute of the prompts queued there (not yet prefilled): what their chunks add, in all, to
    the steps of the answers decoding there, and about how long they hold off an answer that arrives
    there now (0: none queued)."""
    absorbable_chunks: float
    """Most chunks of a prompt routed now that the answers decoding there take within their TPOT
    objectives, each as many as its room holds or as its steps left (inf: any number)."""
    free_kv_tokens: float
    load: int
    max_ongoing: int
    node: int
    """The instance's node, as a small integer shared by all pools."""
    prefill_chunk_tokens: int
    """Most prompt tokens its engine prefills in one step; 0: a whole prompt in one step."""
    tp_size: int = 1
    """Tensor-parallel ranks of its engine (a KV transfer's parts)."""


_COLUMNS = tuple(f.name for f in fields(Row))[3:]


class PoolView:
    """Columns of one pool, named as `Row`'s fields, plus two that fold in whether an
    instance has a free slot, because routing reads them on every request:
    `open_prefill_base_ms` (inf when full) and `open_kv_tokens` (-inf when full)."""

    def __init__(self, rows: list[Row]):
        """A view of `rows`, which must be grouped by node."""
        self.replica_ids = [r.replica_id for r in rows]
        self.kv_addrs = [r.kv_addr for r in rows]
        self.pools = [r.pool for r in rows]
        for name in _COLUMNS:
            dtype = np.int64 if name in ("load", "max_ongoing", "node", "prefill_chunk_tokens", "tp_size") else np.float64
            setattr(self, name, np.array([getattr(r, name) for r in rows], dtype=dtype))
        self.open = self.load < self.max_ongoing
        self.open_prefill_base_ms = np.where(self.open, self.prefill_base_ms, np.inf)
        self.open_kv_tokens = np.where(self.open, self.free_kv_tokens, -np.inf)
        starts = np.r_[True, self.node[1:] != self.node[:-1]] if rows else np.zeros(0, dtype=bool)
        self.node_starts = np.flatnonzero(starts)
        """First row of each node's group."""
        self.group_nodes = self.node[self.node_starts]
        """The node of each group."""
        self.max_node = int(self.node.max()) if rows else -1

    step_base_ms: np.ndarray
    step_ms_per_token: np.ndarray
    prefill_base_ms: np.ndarray
    prefill_ms_per_token: np.ndarray
    prefill_fixed_ms: np.ndarray
    last_seen_s: np.ndarray
    tpot_floor_ms: np.ndarray
    tpot_slack_ms: np.ndarray
    queued_stall_ms: np.ndarray
    absorbable_chunks: np.ndarray
    free_kv_tokens: np.ndarray
    load: np.ndarray
    max_ongoing: np.ndarray
    node: np.ndarray
    prefill_chunk_tokens: np.ndarray
    tp_size: np.ndarray

    def set_row(self, i: int, row: Row) -> None:
        self.kv_addrs[i] = row.kv_addr
        self.pools[i] = row.pool
        for name in _COLUMNS:
            getattr(self, name)[i] = getattr(row, name)
        is_open = row.load < row.max_ongoing
        self.open[i] = is_open
        self.open_prefill_base_ms[i] = row.prefill_base_ms if is_open else np.inf
        self.open_kv_tokens[i] = row.free_kv_tokens if is_open else -np.inf

    def closed(self, i: int) -> PoolView:
        """A copy in which instance `i` takes no new request, for one decision (the registry's
        view stays as it is)."""
        view = copy.copy(self)
        view.open, view.open_prefill_base_ms, view.open_kv_tokens = (
            self.open.copy(), self.open_prefill_base_ms.copy(), self.open_kv_tokens.copy())
        view.open[i], view.open_prefill_base_ms[i], view.open_kv_tokens[i] = False, np.inf, -np.inf
        return view

    def __len__(self) -> int:
        return len(self.replica_ids)
