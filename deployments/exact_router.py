"""A Ray Serve request router that sends a call to the one replica the controller chose.

Serve's default router picks any replica; a disaggregated request must reach the
prefill and decode replicas whose KV receiver the transfer was set up for. The
caller names the replica with the `replica_id` keyword argument of the call; calls
without it (diagnostics such as `finished_spans`) may go to any replica.

The named replica may be missing from the router's list: it died, it is draining after a
scale-down (Serve takes a stopping replica out of its routers' lists at once, and lets it
finish the calls it has), or it is so new that the controller heard its first load report
before this router heard of it. A replica that was in the list and left it is gone for good:
the call fails at once with `ReplicaGone(departed=True)`, and the ingress has the controller
stop routing there. One never seen may yet appear: the router backs off (Serve's routing loop
would otherwise retry at once, spinning the event loop) and, once the call has waited
`MISSING_REPLICA_GRACE_S`, fails it too. Either way the ingress routes the request again, to
another pair, well before the request's own deadline.

A call this router fails is taken out of Serve's index of pending calls by request id. Serve
gives every call a replica makes while serving one request that request's id, so the retry's
call on the same handle has the failed call's id: left indexed, the failed call would shadow the
retry, whose replica, once chosen, Serve could hand to no call, and the retry would wait for its
deadline.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from pdserve.errors import ReplicaGone

log = logging.getLogger("pdserve.router")

TARGET_KWARG = "replica_id"
MISSING_REPLICA_GRACE_S = 2.0
"""How long a call waits for its replica to appear in the router's list (Serve updates routers
within about a second of a replica starting) before it fails as gone."""


MAX_DEPARTED = 4096
"""Replicas remembered as departed; the oldest are forgotten first (ids are never reused)."""


class Departures:
    """Which replicas were running and left (the latest `MAX_DEPARTED`)."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self._departed: dict[str, None] = {}
        """Oldest first."""

    def update(self, running: set[str]) -> None:
        for rid in self.running - running:
            self._departed[rid] = None
            log.info("replica %s left the running replicas: calls for it fail at once", rid)
        while len(self._departed) > MAX_DEPARTED:
            del self._departed[next(iter(self._departed))]
        self.running = running

    def __contains__(self, replica_id: str) -> bool:
        return replica_id in self._departed


class ExactReplicaRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.departed = Departures()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        self.departed.update({r.replica_id.unique_id for r in replicas})
        super().update_replicas(replicas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_KWARG) if pending_request is not None else None
        if target is None:
            return [candidate_replicas]
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        if chosen:
            # Serve asks again, without sleeping, for a call that picking a replica did not fulfil,
            # and neither this router nor the fast path below awaits anything: a call Serve could
            # not match (after a scale-down; a retry shadowed by a failed call, see `_fail`) spun
            # the router's event loop, which every handle in the process shares, and the
            # controller's calls stopped for minutes (the scale-down test in
            # tests/deployments/test_faults_e2e.py). Asked again, the call backs off instead.
            pending_request.routing_context.should_backoff = True
            return [chosen]
        if target in self.departed:
            self._fail(pending_request, ReplicaGone(target, 0.0, departed=True))
            return [candidate_replicas]
        if on_missing_replica(pending_request, target, time.time()):
            self._fail(pending_request, None)
            # Serve's routing loop looks at the call before choosing among candidates: handed some
            # with the call already failed, it ends its work on it (handed none, it would loop on).
            return [candidate_replicas]
        return [[]]

    def _fail(self, pending_request: PendingRequest, error: Exception | None) -> None:
        """Fail the call with `error` (None: it has failed already) and take it out of Serve's
        index by request id, where it would shadow the ingress's retry (see the module's doc)."""
        if error is not None and not pending_request.future.done():
            pending_request.future.set_exception(error)
        internal_id = pending_request.metadata.internal_request_id if pending_request.metadata else None
        if self._pending_requests_by_id.get(internal_id) is pending_request:
            self._remove_pending_request_from_indices(pending_request)

    async def _select_from_candidate_replicas(
        self, candidates: list[RunningReplica], backoff_index: int
    ) -> RunningReplica | None:
        """A call with one candidate (the named replica) goes straight to it unless the router
        knows it is full. Asking its queue length first only delays the call: a replica whose
        event loop is busy answers late, and Serve retries the probe with backoff (seconds per
        call on a loaded machine, twice per disaggregated request). The replica refuses a call
        beyond its `max_ongoing_requests` itself, and Serve then routes it again, probing."""
        if len(candidates) == 1:
            queue_len = self._replica_queue_len_cache.get(candidates[0].replica_id)
            if queue_len is None or queue_len < candidates[0].max_ongoing_requests:
                return candidates[0]
        return await super()._select_from_candidate_replicas(candidates, backoff_index)


def on_missing_replica(pending_request: PendingRequest, target: str, now_s: float) -> bool:
    """The named replica is not in the list: back off, and past the grace fail the call.
    Returns whether the call has failed."""
    pending_request.routing_context.should_backoff = True
    if pending_request.future.done():
        return True
    waited_s = now_s - pending_request.created_at
    if waited_s < MISSING_REPLICA_GRACE_S:
        return False
    log.warning("call for replica %s failed after %.1f s: not among the running replicas", target, waited_s)
    pending_request.future.set_exception(ReplicaGone(target, waited_s))
    return True
