"""The exact-replica router: a call reaches the replica it names; when that replica is not
running, the router asks Serve to back off (never a busy retry) and, past a short grace, fails
the call as a lost replica so the ingress routes the request again."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter

from pdserve.deployments.exact_router import MISSING_REPLICA_GRACE_S, ExactReplicaRouter
from pdserve.deployments.failover import as_serve_error
from pdserve.errors import ReplicaGone, ReplicaLost
from tests.deployments.service_fixtures import init_ray


@dataclass(frozen=True)
class FakeReplicaID:
    """Serve's ReplicaID as the router reads it: a hashable key with its unique id."""

    unique_id: str


def fake_running_replica(unique_id: str) -> SimpleNamespace:
    """What the router reads of Serve's RunningReplica: its id and how many calls it takes."""
    return SimpleNamespace(replica_id=FakeReplicaID(unique_id), max_ongoing_requests=2)


REPLICAS = [fake_running_replica("a"), fake_running_replica("b")]


def pending(target: str | None, age_s: float = 0.0) -> PendingRequest:
    kwargs = {} if target is None else {"replica_id": target}
    return PendingRequest(args=[], kwargs=kwargs, metadata=None, created_at=time.time() - age_s)


def router(departed: tuple[str, ...] = ()) -> ExactReplicaRouter:
    """A router as Serve makes one, having seen `departed` running and leave."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    r = ExactReplicaRouter(DeploymentID(name="decode", app_name="pdserve"), DeploymentHandleSource.UNKNOWN)
    r.departed.update({"a", "b", *departed})
    r.departed.update({"a", "b"})
    return r


async def choose(request: PendingRequest) -> list[list]:
    return await router().choose_replicas(REPLICAS, request)


async def test_a_call_goes_to_the_replica_it_names_and_unnamed_calls_to_any():
    assert await choose(pending("b")) == [[REPLICAS[1]]]
    assert await choose(pending(None)) == [REPLICAS]


async def test_a_named_call_serve_asks_for_again_backs_off_instead_of_spinning_the_shared_event_loop():
    """Serve's routing loop asks again for a call that picking a replica did not fulfil; a call it
    can no longer match (seen after a scale-down) spun every handle's event loop in the process."""
    r = router()
    r._replicas = {rep.replica_id.unique_id: rep for rep in REPLICAS}
    r._replicas_list = list(REPLICAS)
    backoffs: list[int] = []

    async def backoff(attempt: int) -> None:
        backoffs.append(attempt)

    r._backoff = backoff
    request = pending("b")
    choices = r._choose_replicas_with_backoff(request)
    for _ in range(3):  # picked each time, never fulfilled
        assert await anext(choices) == [REPLICAS[1]]
    assert backoffs == [0]  # Serve backs off from its second retry on
    await choices.aclose()


async def test_a_missing_replica_makes_serve_back_off_instead_of_retrying_at_once():
    request = pending("gone")
    assert await choose(request) == [[]]
    assert request.routing_context.should_backoff and not request.future.done()


async def test_a_call_for_a_missing_replica_fails_as_lost_after_the_grace_and_the_ingress_retries_it():
    request = pending("gone", age_s=MISSING_REPLICA_GRACE_S)
    assert await choose(request) == [REPLICAS]  # candidates, so that Serve's loop sees the call done and stops
    with pytest.raises(ReplicaGone, match="replica gone is not running") as err:
        await asyncio.wait_for(request.future, 1)
    lost = as_serve_error(err.value, "decode", "gone")
    assert isinstance(lost, ReplicaLost) and lost.replica_id == "gone" and not lost.departed
    assert await choose(request) == [REPLICAS]  # asked again: the failure stands


async def test_a_call_for_a_replica_that_left_the_running_ones_fails_at_once_as_departed():
    r = router(departed=("old",))  # "old" is draining after a scale-down, or died
    request = pending("old")
    assert await r.choose_replicas(REPLICAS, request) == [REPLICAS]
    with pytest.raises(ReplicaGone, match="left the running replicas") as err:
        await asyncio.wait_for(request.future, 1)
    lost = as_serve_error(err.value, "decode", "old")
    assert isinstance(lost, ReplicaLost) and lost.departed
    newcomer = pending("c")  # never seen: it may be about to appear, so it gets the grace
    assert await r.choose_replicas(REPLICAS, newcomer) == [[]] and not newcomer.future.done()


@pytest.mark.parametrize("first_target", ["old", "never-seen"])
async def test_a_retry_made_while_serving_the_same_request_reaches_its_replica_after_a_call_failed(first_target):
    """Serve gives every call a replica makes while serving one request that request's id. The
    failed call's entry in Serve's index by id shadowed the retry's, so the replica chosen for the
    retry went to no call, and the retry waited for its deadline (300 s, seen after a scale-down)."""
    from ray.serve._private.common import RequestMetadata

    r = router(departed=("old",))
    r._replicas = {rep.replica_id.unique_id: rep for rep in REPLICAS}
    r._replicas_list = list(REPLICAS)
    same_request = RequestMetadata(request_id="r", internal_request_id="ingress-request-1")

    def call(target: str, age_s: float) -> PendingRequest:
        return PendingRequest(args=[], kwargs={"replica_id": target}, metadata=same_request,
                              created_at=time.time() - age_s)

    with pytest.raises(ReplicaGone):
        await asyncio.wait_for(r._choose_replica_for_request(call(first_target, MISSING_REPLICA_GRACE_S)), 5)
    assert await asyncio.wait_for(r._choose_replica_for_request(call("b", 0.0)), 5) is REPLICAS[1]


async def test_the_named_replica_gets_the_call_without_a_queue_length_probe_unless_known_full(monkeypatch):
    probed: list[list] = []

    async def probe(self, candidates, backoff_index):  # Serve's own selection: it probes queue lengths
        probed.append(candidates)
        return None

    monkeypatch.setattr(RequestRouter, "_select_from_candidate_replicas", probe)
    r = router()
    named = SimpleNamespace(replica_id="b", max_ongoing_requests=2)
    assert await r._select_from_candidate_replicas([named], 0) is named and probed == []
    r._replica_queue_len_cache.update("b", 1)
    assert await r._select_from_candidate_replicas([named], 0) is named and probed == []
    r._replica_queue_len_cache.update("b", 2)  # full, as the replica last said: Serve probes and backs off
    assert await r._select_from_candidate_replicas([named], 0) is None and probed == [[named]]
    several = [named, SimpleNamespace(replica_id="a", max_ongoing_requests=2)]  # an unnamed call
    await r._select_from_candidate_replicas(several, 0)
    assert probed[-1] == several


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0},
                  request_router_config=RequestRouterConfig(request_router_class=ExactReplicaRouter))
class Echo:
    """Answers with its own replica id."""

    def whoami(self, replica_id: str = "") -> str:
        return serve.get_replica_context().replica_id.unique_id


@pytest.mark.slow
def test_through_serve_a_named_replica_answers_and_a_gone_one_fails_within_the_grace_not_the_deadline():
    import ray

    init_ray(num_cpus=2)
    try:
        handle = serve.run(Echo.bind(), name="exact-router-test", route_prefix=None)
        seen = {handle.whoami.remote().result(timeout_s=30) for _ in range(20)}  # unnamed: any replica
        assert len(seen) == 2
        for rid in seen:
            assert handle.whoami.remote(replica_id=rid).result(timeout_s=30) == rid
        start = time.monotonic()
        with pytest.raises(Exception) as err:
            handle.whoami.remote(replica_id="no-such-replica").result(timeout_s=60)
        waited_s = time.monotonic() - start
        assert isinstance(as_serve_error(err.value, "decode", "no-such-replica"), ReplicaLost), repr(err.value)
        assert MISSING_REPLICA_GRACE_S <= waited_s < MISSING_REPLICA_GRACE_S + 10
        router = handle._router._asyncio_router.request_router  # Serve's internals: the router in this process
        time.sleep(0.5)
        assert len(router._routing_tasks) == 0  # no routing loop left behind for the failed call
        serve.run(Echo.options(num_replicas=1).bind(), name="exact-router-test", route_prefix=None)
        deadline = time.monotonic() + 30
        while not any(rid in router.departed for rid in seen):  # Serve tells its routers within a second or so
            assert time.monotonic() < deadline, "the router never saw a replica leave"
            time.sleep(0.1)
        left = next(rid for rid in seen if rid in router.departed)  # scaled down: stopping, or stopped
        start = time.monotonic()
        with pytest.raises(Exception) as err:
            handle.whoami.remote(replica_id=left).result(timeout_s=60)
        lost = as_serve_error(err.value, "decode", left)
        assert isinstance(lost, ReplicaLost) and lost.departed, repr(err.value)
        assert time.monotonic() - start < MISSING_REPLICA_GRACE_S  # no grace for a replica seen leaving
    finally:
        serve.shutdown()
        ray.shutdown()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Caller:
    """Calls Echo from inside a replica, as the ingress calls the engine pools: Serve ships the
    router to this process by value, so what it raises must still be what the ingress catches."""

    def __init__(self, echo):
        self.echo = echo

    async def call_missing(self) -> str:
        try:
            await self.echo.whoami.remote(replica_id="no-such-replica")
        except Exception as exc:
            return type(as_serve_error(exc, "decode", "no-such-replica")).__name__
        return "answered"


@pytest.mark.slow
def test_from_inside_another_replica_a_gone_replica_is_a_lost_replica_not_an_engine_failure():
    import ray

    init_ray(num_cpus=2)
    try:
        handle = serve.run(Caller.bind(Echo.bind()), name="exact-router-caller-test", route_prefix=None)
        assert handle.call_missing.remote().result(timeout_s=60) == "ReplicaLost"
    finally:
        serve.shutdown()
        ray.shutdown()
