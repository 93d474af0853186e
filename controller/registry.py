"""The controller's view of the live engine instances (`instance.py`: one of them), kept as one
view per pool for routing, with the prefix index and the corrections instances of a type share.

Each engine replica reports every `report_interval_s`; an instance that misses reports
for `ttl_s` is taken out of routing and comes back with its next report. Routing books each
request on the instances it picked (their ledgers) until it is released.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field, replace

import numpy as np

from pdserve.config.cluster import pool_role
from pdserve.config.routing import LatencyProfile
from pdserve.controller.decision import Decision, RouteRequest
from pdserve.controller.instance import Assignment, Instance, LoadReport
from pdserve.controller.latency_model import Correction, InstanceCorrection
from pdserve.controller.pool_view import PoolView
from pdserve.controller.prefix_index import PrefixIndex

_NO_ROWS = np.zeros(0, np.int64)
log = logging.getLogger(__name__)

DEPARTED_MEMORY_S = 600.0
"""How long a departed replica's reports are ignored: past Serve's longest graceful shutdown."""


@dataclass
class Registry:
    profiles: dict[str, LatencyProfile]
    """Latency profile per accelerator type; "default" for instances of any other type."""
    ttl_s: float = 3.0
    """Missed-report time after which an instance stops receiving requests."""
    kv_reserve_tokens: int = 256
    """Output tokens of KV room reserved per routed request (at most its max_tokens)."""
    tpot_amortize_max_tokens: int = 256
    """Most output tokens an answer's TPOT objective spreads a stall over (`RoutingConfig`)."""
    instances: dict[str, Instance] = field(default_factory=dict)
    _departed: dict[str, float] = field(default_factory=dict)
    """Replicas that left for good (dead, or draining before Serve stops them), when: a draining
    one still reports while it finishes its streams, and must not rejoin routing."""
    _pools: dict[str, list[Instance]] = field(default_factory=dict)
    _views: dict[str, PoolView] = field(default_factory=dict)
    _nodes: dict[str, int] = field(default_factory=dict)
    _shared_fixes: dict[str, tuple[Correction, Correction]] = field(default_factory=dict)
    """Per profile: the (prefill, step) corrections all its instances feed."""
    _routes: dict[str, list[str]] = field(default_factory=dict)
    """request id -> the replicas it was routed to."""
    _next_expiry_s: float = 0.0
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)
    """Which instance's prefix cache holds which prompt prefix, from their reports, by instance number."""
    _numbers: dict[str, int] = field(default_factory=dict)
    """Each replica's number in the prefix index."""
    _free_numbers: list[int] = field(default_factory=list)
    """Numbers of forgotten replicas, reused lowest first: the index's bitmaps stay as wide as the
    cluster is, however many replicas come and go."""
    _row_numbers: dict[str, np.ndarray] = field(default_factory=dict)
    """Per pool, the instance number of each row of its view: a lookup's counts, by number,
    become the view's column in one gather."""

    def report(self, r: LoadReport, now_s: float) -> None:
        if r.replica_id in self._departed:
            return
        inst = self.instances.get(r.replica_id)
        if inst is not None and inst.report.started_at_s != r.started_at_s:
            self.prefixes.forget(self._number(r.replica_id))  # a new incarnation starts with an empty cache
        if r.cache is not None:
            self.prefixes.apply(self._number(r.replica_id), r.cache)
            r = replace(r, cache=None)  # the instance keeps its report: not the events' tokens
        if inst is None or inst.report.started_at_s != r.started_at_s:
            log.info("instance %s joined pool %s (node %s, accelerator %s, kv %s, TP %d)",
                     r.replica_id, r.pool, r.node_id[:8], r.accelerator_type, r.kv_addr or "-", r.tp_size)
            kind = r.accelerator_type if r.accelerator_type in self.profiles else "default"
            node = self._nodes.setdefault(r.node_id, len(self._nodes))
            shared = self._shared_fixes.setdefault(kind, (Correction(), Correction()))
            fresh = Instance(r, now_s, self.profiles[kind], node, unknown_running=r.running,
                             unknown_queued_tokens=r.queued_prefill_tokens,
                             prefill_fix=InstanceCorrection(shared[0]), step_fix=InstanceCorrection(shared[1]))
            self.instances[r.replica_id] = fresh
            self._rebuild(pool_role(r.pool), replace=inst)
            return
        if now_s - inst.last_seen_s > self.ttl_s:
            log.info("instance %s is reporting again after %.1f s", r.replica_id, now_s - inst.last_seen_s)
        inst.report, inst.last_seen_s = r, now_s
        inst.prefill_fix.decay_to(now_s)
        inst.step_fix.decay_to(now_s)
        known = len(inst.assignments)
        inst.unknown_running = min(inst.unknown_running, max(0, r.running - known))
        known_tokens = inst.queued_prefill_tokens() - inst.unknown_queued_tokens
        inst.unknown_queued_tokens = min(inst.unknown_queued_tokens, max(0, r.queued_prefill_tokens - known_tokens))
        self._refresh(inst)

    def cached_tokens(self, pools: tuple[str, ...], prefix_hashes: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Per pool, per row of its view, how many leading tokens of the prompt its prefix cache holds."""
        numbers, tokens = self.prefixes.cached_tokens(prefix_hashes)
        if not len(numbers):
            return {pool: np.zeros(len(self._pools.get(pool, [])), dtype=np.int64) for pool in pools}
        by_number = np.zeros(len(self._numbers) + len(self._free_numbers), np.int64)
        by_number[numbers] = tokens
        return {pool: by_number[self._row_numbers.get(pool, _NO_ROWS)] for pool in pools}

    def placement(self, replica_id: str) -> tuple[str, int]:
        """The view and the row of a known instance; ("", -1) for another."""
        inst = self.instances.get(replica_id)
        return (inst.view_name, inst.slot) if inst is not None else ("", -1)

    def view(self, pool: str) -> PoolView:
        view = self._views.get(pool)
        return PoolView([]) if view is None else view

    def live(self, pool: str, now_s: float) -> list[Instance]:
        return [i for i in self._pools.get(pool, []) if now_s - i.last_seen_s <= self.ttl_s]

    def assign(self, req: RouteRequest, decision: Decision, now_s: float) -> None:
        """Book a routed request on its instances: the prompt on the one that prefills it,
        the sequence on the one that decodes it."""
        kv_tokens = req.prompt_tokens + min(req.max_tokens, self.kv_reserve_tokens)
        prefill_tokens = req.prompt_tokens - decision.cached_tokens
        if req.request_id in self._routes:  # routed again under the same id (the ingress retried): one booking
            self.release(req.request_id)
        targets = [t.replica_id for t in decision.targets()]
        self._routes[req.request_id] = targets
        for t in decision.targets():
            inst = self.instances.get(t.replica_id)
            if inst is None:
                continue
            prefills = t is decision.prefill or decision.prefill is None
            decodes = t is decision.decode
            if prefills:  # its chunks stretch the steps the answers decoding there have left
                queued = inst.queued_chunks()
                for a in inst.assignments.values():
                    if a.kv_tokens:
                        a.absorbed_ms += inst.stall_on_ms(a, prefill_tokens, queued)
            inst.assignments[req.request_id] = Assignment(
                prompt_tokens=req.prompt_tokens, prefill_tokens=prefill_tokens, kv_tokens=kv_tokens if decodes else 0,
                tpot_ms=req.slo.tpot_ms if decodes else float("inf"), prefill_pending=prefills,
                predicted_prefill_ms=inst.raw_prefill_ms(prefill_tokens) if prefills else (0.0, 0.0),
                predicted_step_ms=inst.raw_step_ms(req.prompt_tokens) if decodes else (0.0, 0.0),
                assigned_at_s=now_s, expires_at_s=now_s + req.lifetime_s, owner=req.ingress_id,
                answer_tokens=min(req.max_tokens, self.tpot_amortize_max_tokens) if decodes else 0,
                max_tokens=req.max_tokens if decodes else 0,
                arrives_at_s=now_s + decision.predicted_ttft_ms / 1e3 if decodes and not prefills else None)
            self._refresh(inst)

    def prefill_done(self, request_id: str, prefill_ms: float, now_s: float) -> None:
        """The request's prompt is prefilled (`prefill_ms`: from the engine call's dispatch to its first
        token, as the ingress saw it, on either path) and its first token came at `now_s`: that
        instance's queue shrinks and its prefill prediction is corrected; its answer is decoding."""
        for rid in self._routes.get(request_id, []):
            inst = self.instances.get(rid)
            a = inst.assignments.get(request_id) if inst else None
            if inst is None or a is None:
                continue
            if a.kv_tokens:
                a.decoding_since_s = now_s
            if not a.prefill_pending:
                self._refresh(inst)
                continue
            inst.prefill_fix.observe(*a.predicted_prefill_ms, prefill_ms)
            if a.kv_tokens:  # local prefill: the instance decodes it next
                a.prefill_pending = False
            else:
                del inst.assignments[request_id]
            self._refresh(inst)

    def release(self, request_id: str, tpot_ms: float | None = None) -> None:
        """The request ended; `tpot_ms` (when it produced two tokens or more) corrects the
        decode instance's step prediction."""
        for rid in self._routes.pop(request_id, []):
            inst = self.instances.get(rid)
            a = inst.assignments.pop(request_id, None) if inst else None
            if inst is None or a is None:
                continue
            if tpot_ms and any(a.predicted_step_ms):
                inst.step_fix.observe(*a.predicted_step_ms, tpot_ms)
            self._refresh(inst)

    def expire(self, now_s: float, every_s: float = 1.0) -> None:
        """Drop bookings past their request's deadline (looked at most every `every_s`)."""
        if now_s < self._next_expiry_s:
            return
        self._next_expiry_s = now_s + every_s
        expired = {rid for inst in self.instances.values() for rid, a in inst.assignments.items()
                   if a.expires_at_s < now_s}
        for request_id in expired:
            log.warning("request %s: booking dropped without a release: its deadline passed", request_id)
            self.release(request_id)
        for rid in [rid for rid, at in self._departed.items() if now_s - at > DEPARTED_MEMORY_S]:
            del self._departed[rid]

    def keep_owners(self, running: set[str], as_of_s: float) -> None:
        """Drop the bookings made before `as_of_s` by ingresses not in `running` (the ingress
        replicas Serve ran then): theirs will never be released."""
        gone = {rid: a.owner for inst in self.instances.values() for rid, a in inst.assignments.items()
                if a.owner and a.owner not in running and a.assigned_at_s < as_of_s}
        for request_id, owner in gone.items():
            log.warning("request %s: booking dropped without a release: its ingress %s is gone", request_id, owner)
            self.release(request_id)

    def forget_stale(self, now_s: float, after_s: float = 60.0) -> None:
        """Drop instances silent for `after_s`: their replicas are gone for good."""
        for rid in [rid for rid, i in self.instances.items() if now_s - i.last_seen_s > after_s]:
            self.forget(rid, f"silent for {now_s - self.instances[rid].last_seen_s:.0f} s")

    def forget(self, replica_id: str, why: str, now_s: float | None = None) -> None:
        """Take an instance out of routing and drop its ledger; unknown ids are ignored. With
        `now_s` it left for good: its reports are ignored from then on."""
        if now_s is not None:
            self._departed[replica_id] = now_s
        if replica_id in self._numbers:
            number = self._numbers.pop(replica_id)
            self.prefixes.forget(number)
            heapq.heappush(self._free_numbers, number)
        inst = self.instances.pop(replica_id, None)
        if inst is None:
            return
        log.info("instance %s removed (%s) with %d requests routed to it", replica_id, why, len(inst.assignments))
        self._rebuild(inst.view_name, replace=inst)

    def _number(self, replica_id: str) -> int:
        """The replica's number in the prefix index: a forgotten replica's, lowest first, else a new one."""
        number = self._numbers.get(replica_id)
        if number is None:
            number = heapq.heappop(self._free_numbers) if self._free_numbers else len(self._numbers)
            self._numbers[replica_id] = number
        return number

    def _refresh(self, inst: Instance) -> None:
        self._views[inst.view_name].set_row(inst.slot, inst.row())

    def _rebuild(self, pool: str, replace: Instance | None) -> None:
        members = [i for i in self._pools.get(pool, []) if i is not replace]
        kept = {id(i) for i in members}
        members += [i for i in self.instances.values() if i.view_name == pool and id(i) not in kept]
        members.sort(key=lambda i: i.node)  # stable: a pool's rows keep their order within a node
        for slot, i in enumerate(members):
            i.slot = slot
        self._row_numbers[pool] = np.array([self._number(i.replica_id) for i in members], np.int64)
        self._pools[pool] = members
        self._views[pool] = PoolView([i.row() for i in members])
