"""Conversation workloads: their shapes from the published statistics they cite, files of them,
and the client that plays them turn by turn (against a fake service)."""

import asyncio

import numpy as np
import pytest

from pdserve.bench.conversations import (
    BUILT_IN,
    Conversation,
    ConversationWorkload,
    load,
    make_conversations,
    run_conversations,
)
from pdserve.bench.workloads import LengthDist, Workload
from tests.bench.fake_service import FakeSSEServer

VOCAB = list(range(100, 150))


def test_turn_counts_follow_the_cited_mean_and_only_contents_change_with_the_content_seed():
    workload = BUILT_IN["multi-turn"]
    convs = make_conversations(workload, 4000, VOCAB, seed=1, content_seed=7)
    turns = np.array([len(c.messages) for c in convs])
    assert abs(turns.mean() - workload.turns_mean) < 0.1 and turns.max() <= workload.max_turns
    assert abs(np.mean([len(m) for c in convs for m in c.messages]) - 69.5) < 5
    assert all(c.think_s[0] == 0.0 and len(c.think_s) == len(c.answer_tokens) == len(c.messages) for c in convs)
    again = make_conversations(workload, 4000, VOCAB, seed=1, content_seed=7)
    fresh = make_conversations(workload, 4000, VOCAB, seed=1, content_seed=8)
    assert again == convs
    assert [[len(m) for m in c.messages] for c in fresh] == [[len(m) for m in c.messages] for c in convs]
    assert [c.answer_tokens for c in fresh] == [c.answer_tokens for c in convs]
    assert all(f.messages[0][:8] != c.messages[0][:8] for f, c in zip(fresh, convs, strict=True))


def test_shared_system_prompts_are_few_and_start_every_conversation():
    convs = make_conversations(BUILT_IN["shared-prefix"], 200, VOCAB, seed=0, content_seed=0)
    systems = {c.system for c in convs}
    assert len(systems) == 8 and {len(s) for s in systems} == {1024}
    assert {len(c.messages) for c in convs} == {1}


def test_a_conversation_file_is_read_and_a_bad_one_is_refused_by_field(tmp_path):
    good = tmp_path / "chat.yaml"
    good.write_text("kind: conversation\nname: mine\nsource: our logs\nturns_mean: 3\nthink_time_s: 2\n"
                    "user_tokens: {mean: 50}\nanswer_tokens: {median: 100}\n")
    assert load(str(good)) == ConversationWorkload(name="mine", source="our logs", turns_mean=3, think_time_s=2,
                                                   user_tokens=LengthDist(mean=50), answer_tokens=LengthDist(median=100))
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text() + "system_prompts: 4\n")
    with pytest.raises(ValueError, match="system_prompts and system_prompt_tokens go together"):
        load(str(bad))
    assert isinstance(load("chat"), Workload)  # single requests still load as before
    with pytest.raises(ValueError, match="conversation workloads built in: multi-turn, shared-prefix"):
        load("no-such-workload")


class FakeChatService(FakeSSEServer):
    """Answers every prompt with the text " a b" (2 tokens) and counts the prompt as sent; a prompt
    holding token 13 gets an error event."""

    def events(self, body: dict) -> list[dict] | None:
        if 13 in body["prompt"]:
            return [{"error": {"message": "engine died"}}]
        return [{"choices": [{"index": 0, "text": " a"}]}, {"choices": [{"index": 0, "text": " b"}]},
                {"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": len(body["prompt"]),
                                          "prompt_tokens_details": {"cached_tokens": 4}}}]


def _encode(text: str) -> list[int]:
    return [{"a": 1, "b": 2}[w] for w in text.split()]


def _play(workload: ConversationWorkload, conversations, max_model_len: int = 1000, objectives=(None, None)):
    async def go():
        async with FakeChatService() as service:
            turns = await run_conversations(service.base_url, "m", conversations, [0.0] * len(conversations),
                                            _encode, max_model_len, timeout_s=5.0, objectives=objectives)
            return service.bodies, turns

    return asyncio.run(go())


TINY = ConversationWorkload(name="tiny", source="this test", turns_mean=3, max_turns=3, think_time_s=0.01,
                            user_tokens=LengthDist(mean=3, sigma=0), answer_tokens=LengthDist(mean=2, sigma=0))


def test_each_turn_sends_the_whole_history_with_the_answers_and_names_its_conversation():
    [conv] = [c for c in make_conversations(TINY, 50, VOCAB, 0, 0) if len(c.messages) == 3][:1]
    bodies, turns = _play(TINY, [conv])
    m1, m2, m3 = (list(m) for m in conv.messages)
    assert [b["prompt"] for b in bodies] == [m1, m1 + [1, 2] + m2, m1 + [1, 2] + m2 + [1, 2] + m3]
    assert {b["user"] for b in bodies} == {"conversation-0"} and all(b["ignore_eos"] for b in bodies)
    assert [s.kind for s, _ in turns] == ["first_turn", "later_turn", "later_turn"]
    assert [(r.outcome, r.cached_tokens, r.prompt_tokens) for _, r in turns] == [("ok", 4, 3), ("ok", 4, 8),
                                                                                  ("ok", 4, 13)]
    assert turns[1][0].arrival_s >= turns[0][0].arrival_s + turns[0][1].e2e_ms / 1e3  # after the answer
    assert not any("ttft_ms" in b or "tpot_ms" in b for b in bodies)  # no objectives: the service's defaults


def test_every_turn_carries_the_objectives_it_is_judged_by():
    [conv] = [c for c in make_conversations(TINY, 50, VOCAB, 0, 0) if len(c.messages) == 3][:1]
    bodies, _ = _play(TINY, [conv], objectives=(1500.0, 80.0))
    assert [(b["ttft_ms"], b["tpot_ms"]) for b in bodies] == [(1500.0, 80.0)] * 3


def test_a_conversation_ends_at_a_failed_turn_or_a_full_context():
    def conversation(*messages):
        return Conversation((), messages, (2,) * len(messages), (0.0,) * len(messages))

    failing = conversation((5, 6, 7), (13, 14, 15), (8, 9, 10))
    _, turns = _play(TINY, [failing])
    assert [r.outcome for _, r in turns] == ["ok", "error"]
    long = conversation((5, 6, 7), (8, 9, 10), (11, 12, 14))
    _, turns = _play(TINY, [long], max_model_len=12)  # the third turn would need 3 + 2 + 3 + 2 + 3 + 2 = 15
    assert [len(s.prompt) for s, _ in turns] == [3, 8]
