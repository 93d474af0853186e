"""The controller's side of expert buffering: windowed counts from cumulative reports, the hot
set per layer, the pool's figures, and the hot set answered to buffered replicas."""

import asyncio

from pdserve.config.routing import RoutingConfig
from pdserve.controller.hot_experts import ExpertReport, ExpertWindow, describe, hot_set
from pdserve.controller.instance import LoadReport
from pdserve.controller.server import Controller


def _report(acts: list[list[int]], hits: int = 0, misses: int = 0, tokens: int = 0, slots: int = 4,
            moved: int = 0) -> ExpertReport:
    return ExpertReport(slots=slots, top_k=2, hits=hits, misses=misses, bytes_moved=moved, stall_s=0.0,
                        tokens=tokens, activations=acts)


def test_window_sums_what_each_replica_added_since_its_last_report() -> None:
    w = ExpertWindow(window_s=60)
    w.add("a", _report([[5, 0, 1]], tokens=3), now_s=0)
    w.add("a", _report([[9, 0, 3]], tokens=6), now_s=1)  # +4, +0, +2
    w.add("b", _report([[0, 7, 0]], tokens=4), now_s=1)
    assert w.counts(now_s=2) == [[9, 7, 3]]


def test_a_restarted_replica_starts_over_instead_of_subtracting() -> None:
    w = ExpertWindow(window_s=60)
    w.add("a", _report([[50, 50]], tokens=50), now_s=0)
    w.add("a", _report([[2, 1]], tokens=2), now_s=1)  # its counters went back: a new incarnation
    assert w.counts(now_s=1) == [[52, 51]]


def test_counts_older_than_the_window_drop_out() -> None:
    w = ExpertWindow(window_s=10)
    w.add("a", _report([[8, 0]], tokens=4), now_s=0)
    w.add("a", _report([[8, 6]], tokens=7), now_s=8)
    assert w.counts(now_s=9) == [[8, 6]]
    assert w.counts(now_s=15) == [[0, 6]]


def test_figures_are_per_token_over_the_window_and_idle_pools_read_as_all_hits() -> None:
    w = ExpertWindow(window_s=60)
    assert w.figures(now_s=0)["hit_rate"] == 1.0
    w.add("a", _report([[1]], hits=9, misses=1, tokens=5, moved=500), now_s=0)
    f = w.figures(now_s=1)
    assert f["hit_rate"] == 0.9 and f["bytes_moved_per_token"] == 100.0


def test_hot_set_is_the_most_used_experts_per_layer_ties_to_the_lower_id() -> None:
    counts = [[1, 9, 9, 0, 4], [7, 0, 0, 7, 1]]
    assert hot_set(counts, 2) == [[1, 2], [0, 3]]
    assert hot_set(counts, 0) == [[], []]
    assert describe(counts, [[1, 2], [0, 3]]).startswith("layer 0: [1, 2] 78% of 23")


def test_a_buffered_replica_gets_its_pools_hot_set_sized_slots_minus_top_k() -> None:
    c = Controller("disaggregated", RoutingConfig(), kv_bytes_per_token=1000, expert_windows_s={"decode": 30})
    base = LoadReport("d1", "decode", "n1", None, "127.0.0.1:1", 8, 1.0)
    assert asyncio.run(c.report(base)) is None  # not buffered: nothing to pin
    acts = [[0, 5, 9, 1, 7, 2], [3, 3, 0, 8, 0, 1]]
    hot = asyncio.run(c.report(LoadReport(**{**base.__dict__, "experts": _report(acts, 8, 2, 10)})))
    assert hot == [[2, 4], [0, 3]]  # 4 slots - top-2 = 2 pinned per layer
    status = asyncio.run(c.expert_status())
    assert status["decode"]["hot"] == hot and status["decode"]["hit_rate"] == 0.8
    assert c.experts["decode"].window_s == 30
