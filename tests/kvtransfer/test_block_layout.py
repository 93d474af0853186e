"""BlockLayout moves whole blocks between paged KV tensors as raw bytes, for both vLLM layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.kvtransfer.block_layout import BlockLayout, contiguous_runs
from pdserve.kvtransfer.fingerprint import KVFingerprint
from tests.kvtransfer.copy_counter import CopyCounter

HEADS, BLOCK_SIZE, HEAD = 2, 4, 8
SENTINEL = -7.0


def cpu_cache(num_blocks: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(num_blocks, HEADS, BLOCK_SIZE, 2 * HEAD).to(dtype)


def gpu_like_cache(num_blocks: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, num_blocks, BLOCK_SIZE, HEADS, HEAD).to(dtype)


LAYOUTS = {"cpu": (cpu_cache, 0), "gpu_like": (gpu_like_cache, 1)}


def block(kv: torch.Tensor, layout: str, i: int) -> torch.Tensor:
    return kv[i] if layout == "cpu" else kv[:, i]


def payload_of(parts: list[memoryview]) -> memoryview:
    return memoryview(b"".join(parts))


@pytest.fixture(params=list(LAYOUTS))
def layout(request) -> str:
    return request.param


def test_block_dim_and_block_bytes_match_the_fingerprint(layout):
    make, dim = LAYOUTS[layout]
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        lay = BlockLayout(make(9, dtype), num_blocks=9)
        fp = KVFingerprint("m", name, BLOCK_SIZE, layout, 1, HEADS, HEAD)
        assert lay.block_dim == dim
        itemsize = 4 if name == "float32" else 2
        assert lay.block_bytes == fp.block_bytes_per_layer == 2 * HEADS * BLOCK_SIZE * HEAD * itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_between_differently_grouped_block_ids(layout, dtype):
    make, _ = LAYOUTS[layout]
    src_kv, dst_kv = make(10, dtype), make(12, dtype).fill_(SENTINEL)
    src_ids = [7, 8, 2, 3, 4, 0]
    dst_ids = [0, 1, 2, 9, 10, 5]
    src, dst = BlockLayout(src_kv, 10), BlockLayout(dst_kv, 12)
    copied = dst.write(dst_ids, payload_of(src.read(src_ids)))
    assert copied == len(src_ids) * src.block_bytes
    for s, d in zip(src_ids, dst_ids, strict=False):
        assert torch.equal(block(dst_kv, layout, d), block(src_kv, layout, s))
    for d in set(range(12)) - set(dst_ids):
        assert (block(dst_kv, layout, d) == SENTINEL).all()


def test_none_destinations_are_skipped_and_left_untouched(layout):
    make, _ = LAYOUTS[layout]
    src_kv, dst_kv = make(8), make(8).fill_(SENTINEL)
    src_ids = [1, 2, 3, 4, 5, 6]
    dst_ids = [0, None, 2, 3, None, 7]
    src, dst = BlockLayout(src_kv, 8), BlockLayout(dst_kv, 8)
    copied = dst.write(dst_ids, payload_of(src.read(src_ids)))
    assert copied == 4 * src.block_bytes
    for s, d in zip(src_ids, dst_ids, strict=False):
        if d is not None:
            assert torch.equal(block(dst_kv, layout, d), block(src_kv, layout, s))
    for d in (1, 4, 5, 6):
        assert (block(dst_kv, layout, d) == SENTINEL).all()


def test_read_views_the_cache_in_place_and_write_counts_every_byte_torch_copies(layout):
    make, _ = LAYOUTS[layout]
    src_kv, dst_kv = make(8, torch.bfloat16), make(8, torch.bfloat16)
    src, dst = BlockLayout(src_kv, 8), BlockLayout(dst_kv, 8)
    with CopyCounter() as copies:
        parts = src.read([6, 1, 2])
    assert copies.copied_bytes == 0, copies.ops
    with CopyCounter() as copies:
        copied = dst.write([None, 3, 4], payload_of(parts))
    assert copied == copies.copied_bytes == 2 * dst.block_bytes, copies.ops


def test_a_device_cache_is_not_read_in_place():
    lay = BlockLayout(gpu_like_cache(4).to("meta"), 4)
    with pytest.raises(ValueError, match="LayerStager"):
        lay.read([0])


def test_all_none_destinations_copy_nothing(layout):
    make, _ = LAYOUTS[layout]
    src, dst_kv = BlockLayout(make(4), 4), make(4).fill_(SENTINEL)
    assert BlockLayout(dst_kv, 4).write([None, None], payload_of(src.read([0, 1]))) == 0
    assert (dst_kv == SENTINEL).all()


def test_payload_order_is_blocks_in_order_with_all_k_before_all_v(layout):
    make, _ = LAYOUTS[layout]
    kv = make(10)
    ids = [6, 1, 2, 9]
    got = b"".join(BlockLayout(kv, 10).read(ids))
    if layout == "cpu":
        want = kv[ids].numpy().tobytes()
    else:
        want = kv[0, ids].numpy().tobytes() + kv[1, ids].numpy().tobytes()
    assert got == want


def test_read_returns_views_that_alias_the_cache_tensor(layout):
    make, _ = LAYOUTS[layout]
    kv = make(6)
    parts = BlockLayout(kv, 6).read([1, 2, 4])
    whole = kv.view(torch.uint8).numpy()
    for part in parts:
        assert np.shares_memory(np.frombuffer(part, np.uint8), whole)
    before = bytes(parts[0][:4])
    block(kv, layout, 1).fill_(123.0)
    assert bytes(parts[0][:4]) != before
    assert np.frombuffer(parts[0][:4], np.float32)[0] == 123.0


def test_write_accepts_read_only_bytes_from_the_network(layout):
    make, _ = LAYOUTS[layout]
    src_kv, dst_kv = make(3), make(3).fill_(SENTINEL)
    wire = bytes(b"".join(BlockLayout(src_kv, 3).read([0, 1, 2])))
    BlockLayout(dst_kv, 3).write([2, 1, 0], memoryview(wire))
    assert torch.equal(block(dst_kv, layout, 2), block(src_kv, layout, 0))
    assert torch.equal(block(dst_kv, layout, 0), block(src_kv, layout, 2))


@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_wrong_payload_size_raises_value_error(layout, delta):
    make, _ = LAYOUTS[layout]
    dst_kv = make(4).fill_(SENTINEL)
    dst = BlockLayout(dst_kv, 4)
    with pytest.raises(ValueError, match="payload has"):
        dst.write([0, 1], memoryview(bytes(2 * dst.block_bytes + delta)))
    assert (dst_kv == SENTINEL).all()


def test_payload_for_more_blocks_than_ids_is_refused(layout):
    make, _ = LAYOUTS[layout]
    dst = BlockLayout(make(4), 4)
    with pytest.raises(ValueError):
        dst.write([0], memoryview(bytes(2 * dst.block_bytes)))


@pytest.mark.parametrize(
    "shape, num_blocks",
    [((5, 2, 4, 16), 7), ((3, 7, 4, 2, 8), 7), ((2, 5, 4, 2, 8), 7), ((11,), 7)],
)
def test_cannot_find_the_block_dim_raises_value_error(shape, num_blocks):
    with pytest.raises(ValueError, match="cannot find the block dim"):
        BlockLayout(torch.zeros(shape), num_blocks)


def test_non_contiguous_cache_is_refused():
    kv = torch.zeros(4, 2, 4, 16).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        BlockLayout(kv, 4)


@pytest.mark.parametrize(
    "ids, runs",
    [
        ([], []),
        ([5], [(5, 1)]),
        ([3, 4, 5, 9, 10, 2], [(3, 3), (9, 2), (2, 1)]),
        ([5, 4, 3], [(5, 1), (4, 1), (3, 1)]),
        ([1, 1, 2], [(1, 1), (1, 2)]),
        (list(range(100)), [(0, 100)]),
    ],
)
def test_contiguous_runs_groups_consecutive_ids_in_order(ids, runs):
    assert contiguous_runs(ids) == runs
