"""Stop strings across the point where an answer's replica died: the text the client was not
sent yet still arrives, and a stop string that began before the loss still ends the answer where
an unbroken run ends it. The real `Frontend` over fakes of the engine replicas
(fake_engine_pools.py)."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.model_store import resolve_model
from tests.deployments.fake_engine_pools import (
    ANSWER,
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
