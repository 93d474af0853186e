"""The ingress moving a request whose replica died: the real `Frontend` (tokenizer, routing
loop, retries), with the controller and the engine replicas replaced by fakes of the remote
peers it calls through Serve handles (fake_engine_pools.py), so a resumed answer can be compared
with an unbroken one token for token. Stop strings across the point of loss:
test_answer_seams.py. Real replicas dying under load: tests/deployments/test_faults_e2e.py."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from ray.exceptions import ActorDiedError

from pdserve.controller.decision import Decision, Outcome
from pdserve.errors import KVLost, Overloaded, ReplicaLost, Unavailable
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import Sampling
from tests.deployments.fake_engine_pools import (
    PROMPT,
    FakeController,
    FakePools,
    collect,
    frontend,
    routed,
    unbroken,
)
from tests.deployments.fake_serve_handles import FakeEngineStream, FakeRemoteMethod

pytestmark = pytest.mark.slow  # needs the default model's checkpoint (make model)


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(resolve_model(None))


def test_a_decode_replica_lost_mid_stream_hands_over_without_repeating_or_losing_a_token(model_path):
    controller = FakeController(routed("p1", "d1"), routed("p1", "d2"))
    pools = FakePools(decode_dies_after={"d1": 4})
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=10)
    assert error is None
    assert [t for c in chunks for t in c.token_ids] == unbroken(10)
    assert [c.completion_tokens for c in chunks] == list(range(1, 11))
    assert chunks[-1].finish_reason == "length" and chunks[-1].prompt_tokens == len(PROMPT)
    # The client had the prefill's first token and d1's 4: the retry, routed best effort, went on from
    # the prompt plus those 5 for the 5 left; each decode replica went on from its prefill's first token.
    assert controller.routes == [(3, 10, False), (8, 5, True)]
    assert [(replica, tokens) for replica, _, tokens in pools.served] == [("d1", 4), ("d2", 9)]
    assert controller.lost == ["d1"]
    first_id, second_id = (rid for _, rid, _ in pools.served)
    assert second_id == f"{first_id}-r1"
    assert controller.released == [(first_id, 5), (second_id, 5)]
    # A seeded generator skips what was sampled before: d1 the prefill's token, d2 those 5 and its prefill's.
    assert pools.sampled == [1, 6]
    assert not any(s.cancelled for s in pools.streams)  # both ended by themselves: nothing to cancel


def test_a_request_routed_to_a_draining_replica_is_routed_again_and_the_controller_drops_that_replica(model_path):
    controller = FakeController(routed("p1", "d1"), routed("p1", "d2"))
    lost: list[tuple[str, bool]] = []
    controller.replica_lost = FakeRemoteMethod(lambda rid, departed: asyncio.sleep(0, lost.append((rid, departed))))
    chunks, error = collect(frontend(model_path, controller, FakePools(departed=("d1",))), max_tokens=4)
    assert error is None and [t for c in chunks for t in c.token_ids] == unbroken(4)
    assert lost == [("d1", True)] and [resuming for *_, resuming in controller.routes] == [False, True]


class FakeRoutingStream(FakeEngineStream):
    """A stream Serve is still routing: its `cancel()` blocks until routing ends, as Serve's does."""

    def cancel(self) -> None:
        time.sleep(1.0)
        super().cancel()


async def test_a_client_that_goes_away_frees_its_engine_slot_without_blocking_the_event_loop(model_path):
    pools = FakePools()
    generate = pools._generate
    pools.generate = FakeRemoteMethod(lambda *a, **kw: FakeRoutingStream(generate(*a, **kw)._chunks))
    fe = frontend(model_path, FakeController(routed(None, "d1")), pools)
    chunks = fe.stream(await fe.completion_request(PROMPT, Sampling(max_tokens=50)))
    await anext(chunks)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await chunks.aclose()  # the client went away mid-answer
    await asyncio.sleep(0.3)
    ticker.cancel()
    assert ticks >= 10  # the loop ran on while Serve's cancel waited in a thread


def test_a_prompt_whose_kv_never_arrived_is_served_again_on_another_pair(model_path):
    controller = FakeController(routed("p1", "d1"), routed("p2", "d2"))
    pools = FakePools()
    generate = pools._generate

    def kv_lost_on_d1(req, *args, replica_id: str, **kwargs):
        if replica_id != "d1":
            return generate(req, *args, replica_id=replica_id, **kwargs)

        async def lost():
            raise KVLost(req.request_id)  # what the decode engine raises once the transfer's lease ran out
            yield

        return FakeEngineStream(lost())

    pools.generate = FakeRemoteMethod(kv_lost_on_d1)
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=4)
    assert error is None and [t for c in chunks for t in c.token_ids] == unbroken(4)
    assert [resuming for *_, resuming in controller.routes] == [False, True] and controller.lost == []


def test_a_replica_lost_after_the_last_chunk_leaves_the_answer_whole_and_is_not_retried(model_path):
    controller = FakeController(routed(None, "d1"), routed(None, "d2"))
    pools = FakePools(decode_dies_after={"d1": 5})
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=5)
    assert error is None
    assert [t for c in chunks for t in c.token_ids] == unbroken(5) and chunks[-1].finish_reason == "length"
    assert len(controller.routes) == 1 and controller.lost == ["d1"]


def test_a_prefill_replica_lost_before_the_first_token_is_served_again_on_another(model_path):
    controller = FakeController(routed("p1", "d1"), routed("p2", "d1"))
    pools = FakePools(dead_prefills=("p1",))
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=5)
    assert error is None
    assert [t for c in chunks for t in c.token_ids] == unbroken(5)
    assert controller.routes == [(3, 5, False), (3, 5, True)] and controller.lost == ["p1"]


def test_a_prefill_call_stuck_on_a_replica_that_left_the_live_ones_is_given_up_and_served_on_another(model_path):
    controller = FakeController(routed("p1", "d1"), routed("p2", "d1"))
    fe = frontend(model_path, controller, FakePools(hung_prefills=("p1",)))
    live = [{"pool": "prefill", "live": True, "replica_id": "p2"}, {"pool": "decode", "live": True, "replica_id": "d1"}]
    fe.view.observe([*live, {"pool": "prefill", "live": True, "replica_id": "p1"}], time.monotonic())
    fe.view.observe(live, time.monotonic())  # p1 left
    chunks, error = collect(fe, max_tokens=4)
    assert error is None and [t for c in chunks for t in c.token_ids] == unbroken(4)
    assert controller.lost == ["p1"] and [resuming for *_, resuming in controller.routes] == [False, True]


def test_a_second_loss_is_also_handed_over_within_the_retry_budget(model_path):
    controller = FakeController(routed(None, "d1"), routed(None, "d2"), routed(None, "d3"))
    pools = FakePools(decode_dies_after={"d1": 2, "d2": 3})
    chunks, error = collect(frontend(model_path, controller, pools, replica_loss_retries=2), max_tokens=8)
    assert error is None and [t for c in chunks for t in c.token_ids] == unbroken(8)
    assert controller.lost == ["d1", "d2"] and [r[:2] for r in controller.routes] == [(3, 8), (5, 6), (8, 3)]


def test_with_no_retries_a_lost_replica_ends_the_answer_with_a_retriable_error(model_path):
    controller = FakeController(routed("p1", "d1"), routed("p1", "d2"))
    pools = FakePools(decode_dies_after={"d1": 4})
    chunks, error = collect(frontend(model_path, controller, pools, replica_loss_retries=0), max_tokens=10)
    assert [t for c in chunks for t in c.token_ids] == unbroken(1 + 4)  # the prefill's first token, then d1's
    assert isinstance(error, ReplicaLost) and error.http_status == 503 and error.code == "replica_lost"
    assert "Retry-After" in error.headers()
    assert len(controller.routes) == 1 and controller.lost == ["d1"]


def test_with_no_decode_replica_left_the_answer_ends_with_a_retriable_error_after_route_wait(model_path):
    gone = Decision(Outcome.UNAVAILABLE, reason="pool decode has no live instance")
    controller = FakeController(routed("p1", "d1"), gone)
    pools = FakePools(decode_dies_after={"d1": 2})
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=10)
    assert [t for c in chunks for t in c.token_ids] == unbroken(1 + 2)
    assert type(error) is Unavailable and "no live instance" in error.message
    assert len(controller.routes) > 2  # it asked again while waiting for a replica


def test_a_controller_that_does_not_answer_is_waited_for_and_the_request_served(model_path):
    controller = FakeController(ActorDiedError(), ActorDiedError(), routed("p1", "d1"))
    chunks, error = collect(frontend(model_path, controller, FakePools(), route_wait_s=5), max_tokens=3)
    assert error is None and [t for c in chunks for t in c.token_ids] == unbroken(3)
    assert len(controller.routes) == 3


def test_overload_is_refused_at_once_not_waited_out(model_path):
    busy = Decision(Outcome.OVERLOADED, reason="every decode instance is full", retry_after_s=0.1)
    controller = FakeController(busy)
    chunks, error = collect(frontend(model_path, controller, FakePools()), max_tokens=3)
    assert chunks == [] and isinstance(error, Overloaded) and len(controller.routes) == 1


def test_an_answer_resumed_while_the_pool_is_full_waits_for_room_instead_of_failing(model_path):
    busy = Decision(Outcome.OVERLOADED, reason="every decode instance is full", retry_after_s=0.05)
    controller = FakeController(routed(None, "d1"), busy, busy, routed(None, "d2"))
    pools = FakePools(decode_dies_after={"d1": 1})
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=4)
    assert error is None and [t for c in chunks for t in c.token_ids] == unbroken(4)
    assert [resuming for _, _, resuming in controller.routes] == [False, True, True, True]


def test_a_held_request_asks_again_when_told_saying_how_long_it_was_held_for_longer_than_the_route_wait(model_path):
    held = Decision(Outcome.HELD, reason="held: no instance can prefill it sparing its answers", retry_after_s=0.2)
    controller = FakeController(held, held, held, routed(None, "d1"))
    fe = frontend(model_path, controller, FakePools(), route_wait_s=0.3)
    chunks, error = collect(fe, max_tokens=3)
    assert error is None and [t for c in chunks for t in c.token_ids] == unbroken(3)
    assert fe.metrics.registry.get_sample_value("pdserve_route_held_seconds_count") == 1
    assert fe.metrics.registry.get_sample_value("pdserve_route_held_seconds_sum") >= 0.6
    asked = controller.asked
    assert len(asked) == 4 and asked[0].held_ms == 0.0
    waits_ms = [b.held_ms - a.held_ms for a, b in zip(asked, asked[1:], strict=False)]
    assert all(w >= 200 for w in waits_ms), waits_ms  # it waited as told, 600 ms in all, past the 300 ms route wait
    # What is left of its deadline shrinks by the time held, so its bookings expire when it does.
    assert all(math.isclose(a.lifetime_s - b.lifetime_s, w / 1000, abs_tol=1e-3)
               for a, b, w in zip(asked, asked[1:], waits_ms, strict=False))


class FakeSnapshotController(FakeController):
    """Also answers the ingress's poller: `live` instances per pool, counting snapshot calls."""

    def __init__(self, live: dict[str, int]):
        super().__init__(routed("p1", "d1"))
        self.live, self.snapshots = live, 0
        self.snapshot = FakeRemoteMethod(self._snapshot)
        self.autoscale_status = FakeRemoteMethod(lambda: {})
        self.expert_status = FakeRemoteMethod(lambda: {})

    async def _snapshot(self) -> list[dict]:
        self.snapshots += 1
        return [{"pool": pool, "live": True, "replica_id": f"{pool}-{i}"} for pool, n in self.live.items()
                for i in range(n)]


async def test_health_probes_are_answered_from_the_ingress_view_without_calling_the_controller(model_path):
    controller = FakeSnapshotController({"prefill": 1, "decode": 2})
    fe = frontend(model_path, controller, FakePools())
    fe.metrics.observe_instances = lambda snapshot: None  # the gauges' own input is tested elsewhere
    await fe.start_polling(interval_s=0.05)
    await asyncio.sleep(0.2)
    polled = controller.snapshots
    answers = [await fe.health() for _ in range(50)]
    assert controller.snapshots - polled <= 1  # the poller's own next call, at most
    assert answers[0]["status"] == "ok" and answers[0]["live_instances"] == {"prefill": 1, "decode": 2}
    fe._poller.cancel()
    await asyncio.sleep(0.05 * 6)  # no poller: the view goes stale
    before = controller.snapshots
    answers = [await fe.health() for _ in range(50)]
    assert controller.snapshots - before == 1 and all(a["status"] == "ok" for a in answers)  # one refresh for all
    controller.live = {"prefill": 1, "decode": 0}
    await asyncio.sleep(0.05 * 6)
    assert (await fe.health())["status"] == "unavailable"  # a pool without a live instance
    controller.snapshot = FakeRemoteMethod(_controller_away)
    await asyncio.sleep(0.05 * 6)
    away = await fe.health()
    assert away["status"] == "unavailable" and "no recent view" in away["reason"]


async def _controller_away() -> list[dict]:
    raise TimeoutError("the controller did not answer")
