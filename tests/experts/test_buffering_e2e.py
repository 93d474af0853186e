"""Expert buffering inside real vLLM engines serving the generated MoE model (float32, greedy):
output token for token the same as with every expert resident."""

import json
import secrets

import pytest

from pdserve.bench.engine_process import DisaggregatedPair, EngineProcess, EngineSpec
from pdserve.moe_checkpoint import prepare_moe_model

pytestmark = pytest.mark.slow

PROMPTS = [[1, 9690, 28, 957, 314, 253, 1345, 30], list(range(200, 260)), [42] * 5 + list(range(3000, 3040, 3))]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def moe_model() -> str:
    return str(prepare_moe_model())


def _answers(engine: EngineProcess) -> list[list[int]]:
    return [engine.generate({"prompt_token_ids": p, "max_tokens": MAX_TOKENS})["token_ids"] for p in PROMPTS]


def _rpc(engine: EngineProcess, method: str, *args):
    return engine.call("rpc", {"method": method, "args": list(args)})


def test_output_is_identical_for_every_slot_count_from_top_k_to_all_experts(moe_model: str) -> None:
    engine = EngineProcess(EngineSpec(moe_model, expert_buffers=None, log_level="WARNING"))
    try:
        reference = _answers(engine)
        assert len({tuple(a) for a in reference}) == len(PROMPTS), "the test model should not answer alike"
        cases = [(2, "lru"), (3, "lifo"), (6, "pinned_hot"), (8, "lifo"), (8, "lru"), (8, "pinned_hot"),
                 (12, "lru"), (16, "lifo")]
        for slots, policy in cases:
            installed = _rpc(engine, "pdserve_install_expert_buffers", json.dumps({"slots": slots, "policy": policy}))
            assert installed["slots"] == slots and installed["hits"] == installed["misses"] == 0
            if policy == "pinned_hot":
                _rpc(engine, "pdserve_set_hot_experts", [list(range(slots - 2))] * 4)
            try:
                assert _answers(engine) == reference, f"{slots} slots, {policy}"
                stats = _rpc(engine, "pdserve_expert_stats")
            finally:
                _rpc(engine, "pdserve_uninstall_expert_buffers")
            assert stats["tokens"] > 0 and len(stats["activations"]) == 4
            assert sum(map(sum, stats["activations"])) == stats["tokens"] * 2 * 4  # top-2, four MoE layers
            if slots < 16:
                assert stats["misses"] > 0 and stats["bytes_moved_per_token"] > 0
            else:
                assert stats["misses"] == 0 and stats["hit_rate"] == 1.0
        assert _answers(engine) == reference  # uninstalled: back to all resident
        with pytest.raises(RuntimeError, match="cannot hold one token's 2 experts"):
            _rpc(engine, "pdserve_install_expert_buffers", json.dumps({"slots": 1}))
    finally:
        engine.stop()


def test_disaggregated_with_a_buffered_decode_engine_matches_colocated(moe_model: str) -> None:
    colocated = EngineProcess(EngineSpec(moe_model, log_level="WARNING"))
    try:
        reference = _answers(colocated)
    finally:
        colocated.stop()
    buffered = json.dumps({"slots": 8, "policy": "lru"})
    with DisaggregatedPair(moe_model, secrets.token_hex(16), log_level="WARNING",
                           decode_expert_buffers=buffered) as pair:
        answers = [pair.generate(p, MAX_TOKENS) for p in PROMPTS]
        decode_stats = _rpc(pair.decode, "pdserve_expert_stats")
        assert _rpc(pair.prefill, "pdserve_expert_stats") == {}  # the prefill engine keeps every expert resident
    assert [a["token_ids"] for a in answers] == reference
    assert all(a["num_cached_tokens"] > 0 for a in answers)  # the decode engine used the prefill's KV
    assert decode_stats["slots"] == 8 and decode_stats["hits"] + decode_stats["misses"] > 0
