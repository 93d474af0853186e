"""`pdserve bench serve` on a conversation workload, end to end: two colocated float32 engines,
cache-aware and cache-blind routing on the same conversations. Every later turn sends its history
with the answers the service gave, cache-aware routing finds that history cached, and the report
has every conversation field the README documents."""

import json
from itertools import pairwise

import pytest

from pdserve.bench import serve_bench, serve_report, serve_settings
from pdserve.bench.conversations import ConversationWorkload
from pdserve.bench.workloads import LengthDist
from pdserve.model_store import resolve_model
from tests.bench.test_serve_bench_e2e import README, missing
from tests.deployments.service_fixtures import init_ray, service_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CPU_BLOCK_TOKENS = 128  # vLLM's CPU backend caches prefixes in blocks of this many tokens


def documented_conversation_fields() -> list[str]:
    text = README.read_text()
    section = text.split("<!-- bench-serve-conversation-json -->")[1].split("<!-- /bench-serve-conversation-json -->")[0]
    return [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import ray

    init_ray()
    try:
        # A mean far above max_turns: every conversation has 3 turns.
        chats = ConversationWorkload(name="tiny-chats", source="this test", turns_mean=1e9, max_turns=3,
                                     user_tokens=LengthDist(mean=150, sigma=0), answer_tokens=LengthDist(mean=8, sigma=0),
                                     think_time_s=0.2)
        loose = serve_settings.AbsoluteObjective(name="loose", ttft_ms=600_000, tpot_ms=60_000)
        settings = serve_settings.ServeBenchSettings(requests_per_rate=3, rates_rps=[0.25], objectives_ms=[loose],
                                                  calibration_requests=2, calibration_max_tokens=4)
        cfg = service_config(mode="colocated", colocated={"replicas": 2, "cpu_binds": ["0", "1"]})
        rep = serve_bench.bench_configs(cfg, str(resolve_model(None)), ["colocated/cache-aware",
                                                                         "colocated/cache-blind"], [chats], settings)
    finally:
        ray.shutdown()
    return rep, serve_report.write(rep, tmp_path_factory.mktemp("bench-conversations"))


def test_later_turns_carry_their_history_and_cache_aware_routing_finds_it_cached(report):
    rep, _ = report
    assert rep["workload"]["rate_unit"] == "conversations/s"
    for name, cfg in rep["configs"].items():
        assert cfg["service"]["prefix_aware"] is (name == "colocated/cache-aware")
        (run,) = cfg["runs"]
        rows = run["per_request"]
        assert run["ok"] == run["requests"] == 9, run["errors"]  # 3 conversations of 3 turns
        by_conversation: dict[str, list[dict]] = {}
        for row in rows:
            by_conversation.setdefault(row["session_id"], []).append(row)
        assert len(by_conversation) == 3
        for turns in by_conversation.values():
            assert [t["kind"] for t in turns] == ["first_turn", "later_turn", "later_turn"]
            # Each turn's prompt is the last one's, its answer (8 tokens, tokenized again) and a new message.
            assert turns[0]["prompt_tokens"] == 150
            assert all(abs(b["prompt_tokens"] - a["prompt_tokens"] - 158) <= 3 for a, b in pairwise(turns))
            assert turns[0]["cached_tokens"] == 0 and all(t["cached_tokens"] is not None for t in turns)
    aware = rep["configs"]["colocated/cache-aware"]["runs"][0]
    # The router may send a turn past its history when the holder is busier than the recompute costs
    # (conversations overlap); `test_prefix_routing_e2e` checks the holder is taken when both are idle.
    later = [r for r in aware["per_request"] if r["kind"] == "later_turn"]
    assert sum(r["cached_tokens"] >= CPU_BLOCK_TOKENS for r in later) >= len(later) / 2, later
    assert aware["by_kind"]["later_turn"]["cached_prompt_fraction"] > 0.1
    goal = rep["cache_goal"]["colocated"]
    assert (goal["cache_aware"], goal["cache_blind"]) == ("colocated/cache-aware", "colocated/cache-blind")
    assert goal["by_setting"]["loose"]["goodput_rps"] == {"colocated/cache-aware": 0.25, "colocated/cache-blind": 0.25}
    assert goal["by_rate"]["0.25"]["cached_prompt_fraction"]["colocated/cache-aware"] == aware["cached_prompt_fraction"]


def test_report_has_every_conversation_field_the_readme_documents(report):
    _, path = report
    fields = documented_conversation_fields()
    assert len(fields) >= 8
    written = json.loads(path.read_text())
    assert [m for f in fields for m in missing(written, f)] == []
