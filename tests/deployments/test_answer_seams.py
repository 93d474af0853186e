"""An answer served in pieces reads as one: the first token from the prefill replica and the rest
from the decode replica, or an answer handed over after its replica died. Token ids, text and
stop strings across the seam come out as an unbroken answer's would. The real `Frontend` over
fakes of the engine replicas (fake_engine_pools.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdserve.model_store import resolve_model
from pdserve.prefill.requests import Sampling
from tests.deployments.fake_engine_pools import (
    ANSWER,
    PROMPT,
    FakeController,
    FakeTextPools,
    collect,
    frontend,
    routed,
    text_of,
)

pytestmark = pytest.mark.slow  # needs the default model's checkpoint (make model)


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(resolve_model(None))


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def test_the_first_token_comes_from_the_prefill_replica_before_the_decode_replica_is_called(model_path, tokenizer):
    whole, _ = collect(frontend(model_path, FakeController(routed(None, "d1")), FakeTextPools(tokenizer)), 12)
    pools = FakeTextPools(tokenizer)
    fe = frontend(model_path, FakeController(routed("p1", "d1")), pools)
    served_at_first: list[list] = []

    async def go() -> list:
        chunks = []
        async for chunk in fe.stream(await fe.completion_request(PROMPT, Sampling(max_tokens=12))):
            if not chunks:
                served_at_first.append(list(pools.served))
            chunks.append(chunk)
        return chunks

    chunks = asyncio.run(go())
    assert served_at_first == [[]] and chunks[0].token_ids == pools.answer_ids[:1]
    assert [t for c in chunks for t in c.token_ids] == [t for c in whole for t in c.token_ids]
    assert text_of(chunks) == text_of(whole) and chunks[-1].finish_reason == "length"
    # The decode replica went on from the prompt and that token, for the other 11, its KV from p1.
    assert pools.prefills == [("p1", "d1:1")]
    assert [(r, n) for r, _, n in pools.served] == [("d1", len(PROMPT) + 1)]


@pytest.mark.parametrize("prefill", ["p1", None], ids=["kv_moved", "prefilled_where_it_decodes"])
def test_the_controller_learns_the_prefills_time_from_the_engine_call_once_the_first_token_is_on_its_way(
        model_path, tokenizer, prefill):
    controller = FakeController(routed(prefill, "d1"), route_s=1.0)
    fe = frontend(model_path, controller, FakeTextPools(tokenizer, first_token_s=0.2), route_wait_s=5)
    told_at_first: list[list] = []

    async def go() -> None:
        async for _ in fe.stream(await fe.completion_request(PROMPT, Sampling(max_tokens=6))):
            if not told_at_first:
                told_at_first.append(list(controller.told))

    asyncio.run(go())
    assert told_at_first == [[]]  # the client had its first token before the controller was called
    ((_, ms),) = controller.told
    # From the engine call's dispatch to its first token at the ingress on both paths, so that the
    # controller sets them against each other alike: not the routing before it.
    assert 200 <= ms < 1000


def test_a_stop_string_spanning_the_prefills_token_and_the_decode_replicas_ends_the_answer_as_unbroken(
        model_path, tokenizer):
    first = tokenizer.decode(tokenizer.encode(ANSWER, add_special_tokens=False)[:1])
    stop = [ANSWER[len(first) - 2:len(first) + 2]]  # starts in the first token's text, ends in the next one's
    whole, _ = collect(frontend(model_path, FakeController(routed(None, "d1")), FakeTextPools(tokenizer)), 12, stop)
    pools = FakeTextPools(tokenizer)
    chunks, error = collect(frontend(model_path, FakeController(routed("p1", "d1")), pools), 12, stop)
    assert error is None and text_of(chunks) == text_of(whole) == ANSWER[:len(first) - 2]
    assert chunks[-1].finish_reason == whole[-1].finish_reason == "stop"
    assert [s.cancelled for s in pools.streams] == [True]  # the decode replica is stopped generating


def test_an_answer_ending_at_the_prefills_first_token_frees_its_kv_on_the_decode_replica(model_path, tokenizer):
    first = tokenizer.decode(tokenizer.encode(ANSWER, add_special_tokens=False)[:1])
    pools = FakeTextPools(tokenizer)
    chunks, error = collect(frontend(model_path, FakeController(routed("p1", "d1")), pools), 12, [first[2:]])
    assert error is None and text_of(chunks) == first[:2] and chunks[-1].finish_reason == "stop"
    assert pools.served == [] and [replica for _, replica in pools.discarded] == ["d1"]


def test_each_replica_of_the_pair_is_told_the_other_ones_tensor_parallel_size(model_path, tokenizer):
    pools = FakeTextPools(tokenizer)
    chunks, error = collect(frontend(model_path, FakeController(routed("p1", "d1", prefill_tp=2, decode_tp=4)), pools),
                            12)
    assert error is None and chunks[-1].completion_tokens == 12
    # The prefill replica's ranks push to the decode replica's 4; the decode replica waits for 2 parts.
    assert pools.tp_sizes == [("prefill", "p1", 4), ("generate", "d1", 2)]
    first = tokenizer.decode(tokenizer.encode(ANSWER, add_special_tokens=False)[:1])
    pools = FakeTextPools(tokenizer)
    collect(frontend(model_path, FakeController(routed("p1", "d1", prefill_tp=2, decode_tp=4)), pools), 12,
            [first[2:]])
    assert pools.tp_sizes == [("prefill", "p1", 4), ("discard", "d1", 2)]  # both parts of an unused KV freed


def test_a_one_token_answer_is_the_prefill_replicas_alone_and_moves_no_kv(model_path, tokenizer):
    pools = FakeTextPools(tokenizer)
    chunks, error = collect(frontend(model_path, FakeController(routed("p1", "d1")), pools), 1)
    assert error is None and [t for c in chunks for t in c.token_ids] == pools.answer_ids[:1]
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 1
    assert pools.prefills == [("p1", None)] and pools.served == [] and pools.discarded == []


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
