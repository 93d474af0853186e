"""The buffer on CPU tensors: remapped routing runs each token on its own experts' weights,
over several rounds too, and the counters count what moved."""

import pytest
import torch

from pdserve.config.experts import ExpertBufferConfig
from pdserve.experts.buffer import ExpertBuffer

E, H, INTER, TOP_K = 8, 16, 24, 2


def _experts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * INTER, H, generator=g), torch.randn(E, H, INTER, generator=g)


def _moe(x, w13, w2, weights, ids) -> torch.Tensor:
    """A reference fused-MoE: each token's experts (SiLU-gated MLP), weighted and summed."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate, up = (w13[ids[t, k]] @ x[t]).split(INTER)
            out[t] += weights[t, k] * (w2[ids[t, k]] @ (torch.nn.functional.silu(gate) * up))
    return out


def _buffered(buffer: ExpertBuffer, x, weights, ids) -> torch.Tensor:
    out = torch.full_like(x, float("nan"))
    for tokens, experts in buffer.plan(ids):
        rows = list(range(x.shape[0])) if tokens is None else tokens
        out[rows] = _moe(x[rows], buffer.w13, buffer.w2, weights[rows], buffer.admit(experts, ids[rows]))
    return out


def _batch(seed: int, tokens: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(tokens)]).to(torch.int32)
    return torch.randn(tokens, H, generator=g), torch.rand(tokens, TOP_K, generator=g), ids


@pytest.mark.parametrize("slots", [2, 3, 5, 8])
@pytest.mark.parametrize("policy", ["lifo", "lru", "pinned_hot"])
def test_buffered_output_matches_all_experts_resident(slots: int, policy: str) -> None:
    w13, w2 = _experts()
    buffer = ExpertBuffer(0, w13, w2, ExpertBufferConfig(slots=slots, policy=policy), torch.device("cpu"), TOP_K)
    buffer.set_hot([1, 2])
    for step in range(5):
        x, weights, ids = _batch(step)
        torch.testing.assert_close(_buffered(buffer, x, weights, ids), _moe(x, w13, w2, weights, ids))


def test_every_slot_holds_the_expert_the_table_says() -> None:
    w13, w2 = _experts()
    buffer = ExpertBuffer(0, w13, w2, ExpertBufferConfig(slots=3), torch.device("cpu"), TOP_K)
    for step in range(4):
        _buffered(buffer, *_batch(step))
        for expert, slot in buffer.table.slot_of().items():
            assert torch.equal(buffer.w13[slot], w13[expert]) and torch.equal(buffer.w2[slot], w2[expert])
            assert buffer.slot_of[expert].item() == slot


def test_counters_count_hits_misses_and_bytes_of_one_step() -> None:
    w13, w2 = _experts()
    buffer = ExpertBuffer(0, w13, w2, ExpertBufferConfig(slots=4), torch.device("cpu"), TOP_K)
    assert buffer.counters.misses == 0 and buffer.counters.bytes_moved == 0  # the initial fill is not counted
    ids = torch.tensor([[0, 5], [1, 6]], dtype=torch.int32)  # 0 and 1 resident (slots start with 0..3)
    _buffered(buffer, torch.randn(2, H), torch.ones(2, 2), ids)
    c = buffer.counters
    assert (c.hits, c.misses, c.tokens) == (2, 2, 2)
    assert c.bytes_moved == 2 * (w13[0].nbytes + w2[0].nbytes)
    assert buffer.activations() == [1, 1, 0, 0, 0, 1, 1, 0]
    buffer.reset_counters()
    assert buffer.counters.hits == 0 and buffer.activations() == [0] * E


def test_a_batch_needing_more_experts_than_slots_runs_in_rounds_of_whole_tokens() -> None:
    w13, w2 = _experts()
    buffer = ExpertBuffer(0, w13, w2, ExpertBufferConfig(slots=3), torch.device("cpu"), TOP_K)
    ids = torch.tensor([[4, 5], [0, 1], [2, 6]], dtype=torch.int32)  # slots start with 0, 1, 2
    assert buffer.plan(ids) == [([1], [0, 1]), ([0], [4, 5]), ([2], [2, 6])]
    assert buffer.plan(ids[1:2]) == [(None, [0, 1])]


def test_more_slots_than_experts_is_refused_with_the_limit() -> None:
    w13, w2 = _experts()
    with pytest.raises(ValueError, match="at most 8"):
        ExpertBuffer(0, w13, w2, ExpertBufferConfig(slots=9), torch.device("cpu"), TOP_K)


def test_buffering_configured_on_a_model_without_moe_layers_is_an_error_naming_the_fix() -> None:
    from pdserve.experts import vllm_layers

    dense = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    assert vllm_layers.moe_layers(dense) == [] and vllm_layers.stats(dense) == {}
    with pytest.raises(ValueError, match="remove `experts` from the pool or serve a MoE model"):
        vllm_layers.require_buffered(dense)
