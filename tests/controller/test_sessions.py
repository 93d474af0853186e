"""Sessions: a conversation's next turn is known to continue the previous one only when its prompt
does; the table is bounded in count and time."""

from __future__ import annotations

from pdserve.controller.prefix_index import GRAIN_TOKENS, block_hashes
from pdserve.controller.sessions import Sessions

HISTORY = list(range(500, 500 + 10 * GRAIN_TOKENS + 3))


def test_a_turn_that_continues_the_previous_prompt_is_held_where_that_went():
    sessions = Sessions()
    sessions.remember("s1", block_hashes(HISTORY), ["p1", "d1"], now_s=0.0)
    later = HISTORY + list(range(40))
    assert sessions.held("s1", block_hashes(later), now_s=5.0) == (("p1", "d1"), 10 * GRAIN_TOKENS)


def test_another_conversation_under_the_same_session_name_gets_no_hint():
    sessions = Sessions()
    sessions.remember("alice", block_hashes(HISTORY), ["d1"], now_s=0.0)
    other = [7] + HISTORY  # the same words shifted: another prompt
    assert sessions.held("alice", block_hashes(other), now_s=1.0) == ((), 0)
    assert sessions.held("alice", block_hashes(HISTORY[:GRAIN_TOKENS * 4]), now_s=1.0) == ((), 0)  # shorter
    assert sessions.held("bob", block_hashes(HISTORY), now_s=1.0) == ((), 0)
    assert sessions.held("", block_hashes(HISTORY), now_s=1.0) == ((), 0)


def test_sessions_expire_and_the_oldest_go_first_past_the_bound():
    sessions = Sessions(max_sessions=2, ttl_s=60.0)
    for k, name in enumerate(("a", "b", "c")):
        sessions.remember(name, block_hashes(HISTORY), [f"d{k}"], now_s=float(k))
    assert len(sessions) == 2 and sessions.held("a", block_hashes(HISTORY), now_s=3.0) == ((), 0)
    assert sessions.held("c", block_hashes(HISTORY), now_s=3.0)[0] == ("d2",)
    assert sessions.held("b", block_hashes(HISTORY), now_s=62.0) == ((), 0)  # 61 s after its turn
    assert len(sessions) == 1


def test_a_prompt_without_a_whole_piece_is_not_remembered():
    sessions = Sessions()
    sessions.remember("s1", block_hashes(HISTORY[:5]), ["d1"], now_s=0.0)
    assert len(sessions) == 0
