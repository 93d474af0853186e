"""Slot decisions: what each policy evicts, and what it never evicts."""

from pdserve.experts.eviction import FREE, SlotTable, commit, plan_loads, plan_prefetch, split_rounds, touch


def _table(experts: list[int], loaded_at: list[int], used_at: list[int]) -> SlotTable:
    return SlotTable(list(experts), list(loaded_at), list(used_at), clock=max(used_at + loaded_at))


def test_free_slots_are_filled_before_anything_is_evicted() -> None:
    table = _table([3, FREE, 5], [1, 0, 2], [1, 0, 2])
    assert plan_loads(table, [7], "lru") == [(1, 7)]


def test_lru_evicts_the_expert_used_longest_ago() -> None:
    table = _table([0, 1, 2], [1, 1, 1], [5, 2, 9])
    assert plan_loads(table, [4], "lru") == [(1, 4)]


def test_lifo_evicts_the_expert_loaded_last() -> None:
    table = _table([0, 1, 2], [1, 7, 3], [9, 9, 9])
    assert plan_loads(table, [4], "lifo") == [(1, 4)]


def test_pinned_hot_evicts_a_hot_expert_only_when_no_other_can_go() -> None:
    table = _table([0, 1, 2], [1, 1, 1], [1, 5, 9])
    assert plan_loads(table, [4], "pinned_hot", hot={0, 2}) == [(1, 4)]
    assert plan_loads(table, [4, 1], "pinned_hot", hot={0, 2}) == [(0, 4)]


def test_experts_the_batch_uses_are_never_evicted_whatever_the_policy() -> None:
    table = _table([0, 1, 2, 3], [4, 3, 2, 1], [1, 2, 3, 4])
    for policy in ("lifo", "lru", "pinned_hot"):
        loads = plan_loads(table, [0, 1, 8, 9], policy)
        assert sorted(slot for slot, _ in loads) == [2, 3]
        assert sorted(expert for _, expert in loads) == [8, 9]


def test_resident_experts_need_no_load() -> None:
    assert plan_loads(_table([0, 1], [0, 0], [0, 0]), [1, 0], "lru") == []


def test_more_experts_than_slots_is_refused() -> None:
    try:
        plan_loads(SlotTable.empty(2), [0, 1, 2], "lru")
    except ValueError as err:
        assert "3 experts" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_rounds_keep_each_token_whole_fit_the_slots_and_start_with_resident_tokens() -> None:
    tokens = [(5, 1), (7, 9), (1, 2), (9, 7), (3, 4)]
    rounds = split_rounds(tokens, resident={7, 9}, slots=3)
    assert rounds == [([1, 3], [7, 9]), ([0, 2], [5, 1, 2]), ([4], [3, 4])]  # tokens needing no load first


def test_prefetch_never_evicts_an_expert_it_expects_and_respects_its_limit() -> None:
    table = _table([0, 1, 2], [1, 1, 1], [3, 1, 2])
    loads = plan_prefetch(table, likely=[5, 1, 6, 7], limit=2, policy="lru")
    assert [e for _, e in loads] == [5, 6]
    assert 1 not in [table.slot_expert[s] for s, _ in loads]


def test_commit_and_touch_update_the_clocks_policies_read() -> None:
    table = SlotTable.empty(2)
    commit(table, [(0, 4), (1, 6)])
    touch(table, {6})
    assert table.slot_of() == {4: 0, 6: 1}
    assert table.used_at[1] > table.used_at[0]
    assert plan_loads(table, [9], "lru") == [(0, 9)]
