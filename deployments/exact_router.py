"""A Ray Serve request router that sends a call to the one replica the controller chose.

Serve's default router picks any replica; a disaggregated request must reach the
prefill and decode replicas whose KV receiver the transfer was set up for. The
caller names the replica with the `replica_id` keyword argument of the call; calls
without it (diagnostics such as `finished_spans`) may go to any replica.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

TARGET_KWARG = "replica_id"


class ExactReplicaRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_KWARG) if pending_request is not None else None
        if target is None:
            return [candidate_replicas]
        # A replica that is gone yields no candidate: Serve keeps retrying with backoff
        # and the caller's deadline ends the wait.
        return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
