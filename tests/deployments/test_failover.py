"""The ingress moving a request whose replica died: the real `Frontend` (tokenizer, routing
loop, retries), with the controller and the engine replicas replaced by fakes of the remote
peers it calls through Serve handles. The fake decode replicas continue a prompt with token
ids counting up from its last one, so a resumed answer can be compared with an unbroken one
token for token. Real replicas dying under load: tests/deployments/test_faults_e2e.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from pdserve.config.cluster import parse_config
from pdserve.controller.decision import Decision, Outcome, Target
from pdserve.deployments.frontend import Frontend
from pdserve.errors import KVLost, Overloaded, ReplicaGone, ReplicaLost, Unavailable
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import GenerateChunk, Sampling
from tests.deployments.fake_serve_handles import FakeEngineStream, FakeRemoteMethod

pytestmark = pytest.mark.slow  # needs the default model's checkpoint (make model)

PROMPT = [100, 101, 102]


def routed(prefill: str | None, decode: str) -> Decision:
    return Decision(Outcome.ROUTED, prefill=Target(prefill, "", 0) if prefill else None,
                    decode=Target(decode, f"{decode}:1", 0), reason="fake route")


class FakeController:
    """The controller replica as the ingress calls it: `choose` answers from `decisions` in
    turn (the last one repeats; an exception instance is raised, as a dead actor's call is)."""

    def __init__(self, *decisions: Decision | Exception):
        self.decisions = list(decisions)
        self.routes: list[tuple[int, int, bool]] = []
        """(prompt tokens, max tokens, resuming) of every choose call."""
        self.lost: list[str] = []
        self.released: list[tuple[str, int]] = []
        self.choose = FakeRemoteMethod(self._choose)
        self.replica_lost = FakeRemoteMethod(self._replica_lost)
        self.release = FakeRemoteMethod(lambda request_id, tpot_ms, tokens: self.released.append((request_id, tokens)))
        self.prefill_done = FakeRemoteMethod(lambda *args: None)

    async def _choose(self, route, resuming: bool) -> Decision:
        self.routes.append((route.prompt_tokens, route.max_tokens, resuming))
        answer = self.decisions.pop(0) if len(self.decisions) > 1 else self.decisions[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def _replica_lost(self, replica_id: str, departed: bool) -> None:
        self.lost.append(replica_id)


class FakePools:
    """Prefill and decode replicas by id. A decode replica waits for the prompt's KV (unless
    it prefills locally), then generates `max_tokens` ids counting up from the prompt's last;
    one in `decode_dies_after` dies after that many tokens (after its last chunk when that is
    all of them), one in `dead_prefills` dies when
    asked to prefill, so its KV never comes."""

    def __init__(self, decode_dies_after: dict[str, int] | None = None, dead_prefills: tuple[str, ...] = (),
                 departed: tuple[str, ...] = ()):
        self.decode_dies_after = decode_dies_after or {}
        self.departed = departed
        """Decode replicas the router saw leave (drained after a scale-down): calls fail at routing."""
        self.dead_prefills = dead_prefills
        self.served: list[tuple[str, str, int]] = []
        """(replica, request id, prompt tokens) of every generate call."""
        self.streams: list[FakeEngineStream] = []
        self.generate = FakeRemoteMethod(self._generate)
        self.prefill = FakeRemoteMethod(self._prefill)
        self._kv: dict[str, asyncio.Event] = {}

    def __getitem__(self, pool: str) -> FakePools:
        return self

    def options(self, stream: bool) -> FakePools:
        return self

    def _generate(self, req, max_tokens: int, lease_ms: int, *, replica_id: str, local_prefill: bool) -> FakeEngineStream:
        self.served.append((replica_id, req.request_id, len(req.prompt_token_ids)))
        dies_after = self.decode_dies_after.pop(replica_id, None)
        if replica_id in self.departed:
            gone = ReplicaGone(replica_id, 0.0, departed=True)

            async def refused():
                raise gone
                yield

            self.streams.append(FakeEngineStream(refused(), routing_error=gone))
            return self.streams[-1]

        async def chunks():
            if not local_prefill:
                await self._kv.setdefault(req.request_id, asyncio.Event()).wait()
            last = req.prompt_token_ids[-1]
            for i in range(max_tokens):
                if i == dies_after:
                    raise ActorDiedError()
                await asyncio.sleep(0)
                done = i + 1 == max_tokens
                yield GenerateChunk(f" t{last + i + 1}", [last + i + 1], len(req.prompt_token_ids), i + 1,
                                    "length" if done else None)
            if dies_after == max_tokens:
                raise ActorDiedError()

        self.streams.append(FakeEngineStream(chunks()))
        return self.streams[-1]

    async def _prefill(self, req, dest: str, lease_ms: int, *, replica_id: str) -> dict:
        if replica_id in self.dead_prefills:
            raise ActorDiedError()
        self._kv.setdefault(req.request_id, asyncio.Event()).set()
        return {"prefill_ms": 1.0, "kv_transfer": None}


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(resolve_model(None))


def frontend(model_path: str, controller: FakeController, pools: FakePools, **ingress: Any) -> Frontend:
    cfg = parse_config({"max_model_len": 256, "ingress": {"route_wait_s": 0.5, **ingress}})
    return Frontend(cfg, model_path, controller, {"prefill": pools, "decode": pools})


def collect(fe: Frontend, max_tokens: int, stop: list[str] | None = None) -> tuple[list[GenerateChunk],
                                                                                   BaseException | None]:
    """Every chunk the client receives, and the error that ended the answer, if any."""
    chunks: list[GenerateChunk] = []

    async def go() -> None:
        sampling = Sampling(max_tokens=max_tokens, stop=stop or [])
        async for chunk in fe.stream(await fe.completion_request(PROMPT, sampling)):
            chunks.append(chunk)

    try:
        asyncio.run(go())
    except Exception as exc:
        return chunks, exc
    return chunks, None


def unbroken(max_tokens: int) -> list[int]:
    return list(range(PROMPT[-1] + 1, PROMPT[-1] + 1 + max_tokens))


def test_a_decode_replica_lost_mid_stream_hands_over_without_repeating_or_losing_a_token(model_path):
    controller = FakeController(routed("p1", "d1"), routed("p1", "d2"))
    pools = FakePools(decode_dies_after={"d1": 4})
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=10)
    assert error is None
    assert [t for c in chunks for t in c.token_ids] == unbroken(10)
    assert [c.completion_tokens for c in chunks] == list(range(1, 11))
    assert chunks[-1].finish_reason == "length" and chunks[-1].prompt_tokens == len(PROMPT)
    # The second replica was sent the prompt plus the 4 tokens already streamed, for the 6 left,
    # routed best effort; the dead one was reported and both attempts were released.
    assert controller.routes == [(3, 10, False), (7, 6, True)]
    assert [(replica, tokens) for replica, _, tokens in pools.served] == [("d1", 3), ("d2", 7)]
    assert controller.lost == ["d1"]
    first_id, second_id = (rid for _, rid, _ in pools.served)
    assert second_id == f"{first_id}-r1"
    assert controller.released == [(first_id, 4), (second_id, 6)]
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
    assert [t for c in chunks for t in c.token_ids] == unbroken(4)
    assert isinstance(error, ReplicaLost) and error.http_status == 503 and error.code == "replica_lost"
    assert "Retry-After" in error.headers()
    assert len(controller.routes) == 1 and controller.lost == ["d1"]


def test_with_no_decode_replica_left_the_answer_ends_with_a_retriable_error_after_route_wait(model_path):
    gone = Decision(Outcome.UNAVAILABLE, reason="pool decode has no live instance")
    controller = FakeController(routed("p1", "d1"), gone)
    pools = FakePools(decode_dies_after={"d1": 2})
    chunks, error = collect(frontend(model_path, controller, pools), max_tokens=10)
    assert [t for c in chunks for t in c.token_ids] == unbroken(2)
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


ANSWER = " Paris is the capital of France, a large city on the Seine with many museums."


class FakeTextPools(FakePools):
    """Decode replicas that go on with one fixed answer (`ANSWER`'s tokens, from wherever the
    prompt leaves off) and stream its text as vLLM does with stop strings: detokenized after the
    prompt, the last `len(longest stop) - 1` characters held back, a stop string in the generated
    text ending the answer before it; the finish reason comes in a chunk of its own."""

    def __init__(self, tokenizer: Any, **kw: Any):
        super().__init__(**kw)
        self.tokenizer = tokenizer
        self.answer_ids: list[int] = tokenizer.encode(ANSWER, add_special_tokens=False)

    def _generate(self, req, max_tokens: int, lease_ms: int, *, replica_id: str, local_prefill: bool) -> FakeEngineStream:
        self.served.append((replica_id, req.request_id, len(req.prompt_token_ids)))
        dies_after = self.decode_dies_after.pop(replica_id, None)
        start = len(req.prompt_token_ids) - len(PROMPT)
        ids = self.answer_ids[start:start + max_tokens]
        stop, prompt_chars = req.sampling.stop, len(self.tokenizer.decode(req.prompt_token_ids))
        hold = max((len(s) for s in stop), default=1) - 1

        async def chunks():
            sent = 0
            for i, token in enumerate(ids):
                await asyncio.sleep(0)
                text = self.tokenizer.decode(req.prompt_token_ids + ids[:i + 1])[prompt_chars:]
                if hits := [at for s in stop if (at := text.find(s)) >= 0]:
                    yield GenerateChunk(text[sent:min(hits)], [token], len(req.prompt_token_ids), i + 1, "stop")
                    return
                upto = max(sent, len(text) - hold)
                yield GenerateChunk(text[sent:upto], [token], len(req.prompt_token_ids), i + 1)
                sent = upto
                if i + 1 == dies_after:
                    raise ActorDiedError()
            yield GenerateChunk(text[sent:], [], len(req.prompt_token_ids), len(ids), "length")

        self.streams.append(FakeEngineStream(chunks()))
        return self.streams[-1]


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def text_of(chunks: list[GenerateChunk]) -> str:
    return "".join(c.text for c in chunks)


def test_text_held_back_for_a_stop_string_is_still_sent_when_its_replica_dies(model_path, tokenizer):
    stop = ["a stop string that this answer never contains"]
    whole, _ = collect(frontend(model_path, FakeController(routed(None, "d1")), FakeTextPools(tokenizer)), 12, stop)
    controller = FakeController(routed(None, "d1"), routed(None, "d2"))
    chunks, error = collect(frontend(model_path, controller, FakeTextPools(tokenizer, decode_dies_after={"d1": 6})),
                            12, stop)
    assert error is None and controller.lost == ["d1"]
    ids = [t for c in chunks for t in c.token_ids]
    assert text_of(chunks) == tokenizer.decode(ids) == text_of(whole) and chunks[-1].finish_reason == "length"


def test_a_stop_string_spanning_the_point_where_the_replica_died_ends_the_answer_as_unbroken(model_path, tokenizer):
    pools = FakeTextPools(tokenizer, decode_dies_after={"d1": 5})
    seam = len(tokenizer.decode(pools.answer_ids[:5]))
    stop = [ANSWER[seam - 4:seam + 5]]  # its first characters were streamed, as tokens, by the first replica
    whole, _ = collect(frontend(model_path, FakeController(routed(None, "d1")), FakeTextPools(tokenizer)), 16, stop)
    controller = FakeController(routed(None, "d1"), routed(None, "d2"))
    chunks, error = collect(frontend(model_path, controller, pools), 16, stop)
    assert error is None and controller.lost == ["d1"]
    assert text_of(chunks) == text_of(whole) == ANSWER[:seam - 4]
    assert chunks[-1].finish_reason == whole[-1].finish_reason == "stop"
    assert [s.cancelled for s in pools.streams] == [False, True]  # the new replica is stopped generating


def test_a_replica_lost_after_its_last_token_but_before_its_finish_ends_the_answer_with_its_held_text(
        model_path, tokenizer):
    stop = ["a stop string that this answer never contains"]
    controller = FakeController(routed(None, "d1"), routed(None, "d2"))
    chunks, error = collect(frontend(model_path, controller, FakeTextPools(tokenizer, decode_dies_after={"d1": 8})),
                            8, stop)
    assert error is None and controller.lost == ["d1"] and len(controller.routes) == 1  # nothing left to generate
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 8 and text_of(chunks) == tokenizer.decode(ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 8


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
