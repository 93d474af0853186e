"""A Ray Serve request router that sends a call to the one replica the controller chose.

Serve's default router picks any replica; a disaggregated request must reach the
prefill and decode replicas whose KV receiver the transfer was set up for. The
caller names the replica with the `replica_id` keyword argument of the call; calls
without it (diagnostics such as `finished_spans`) may go to any replica.

The named replica may be missing from the router's list: it died, it is draining after a
scale-down, or it is so new that the controller heard its first load report before this
router heard of it. The router then backs off (Serve's routing loop would otherwise retry
at once, spinning the event loop) and, once the call has waited `MISSING_REPLICA_GRACE_S`,
fails it with `ReplicaGone`, which the ingress treats as a lost replica: it routes the
request again, to another pair, well before the request's own deadline.
"""

from __future__ import annotations

import logging
import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

log = logging.getLogger("pdserve.router")

TARGET_KWARG = "replica_id"
MISSING_REPLICA_GRACE_S = 2.0
"""How long a call waits for its replica to appear in the router's list (Serve updates routers
within about a second of a replica starting) before it fails as gone."""


class ReplicaGone(RuntimeError):
    """The replica a call was meant for is not among the deployment's running replicas."""

    def __init__(self, replica_id: str, waited_s: float):
        super().__init__(f"replica {replica_id} is not running (waited {waited_s:.1f} s for it)")
        self.replica_id = replica_id


class ExactReplicaRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_KWARG) if pending_request is not None else None
        if target is None:
            return [candidate_replicas]
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        if chosen:
            return [chosen]
        if on_missing_replica(pending_request, target, time.time()):
            # Serve's routing loop looks at the call before choosing among candidates: handed some
            # with the call already failed, it ends its work on it (handed none, it would loop on).
            return [candidate_replicas]
        return [[]]


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
