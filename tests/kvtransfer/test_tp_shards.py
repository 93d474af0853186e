"""Tensor-parallel KV: which prefill ranks feed which decode ranks, the heads each takes, and a
cache re-sharded between TP sizes byte for byte (both vLLM layouts), without engines."""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer import params
from pdserve.kvtransfer.block_layout import BlockLayout, LoadPiece
from pdserve.kvtransfer.connector_meta import GrpcWorkerMetadata, TransferReport
from pdserve.kvtransfer.fingerprint import KVFingerprint, layout_name, mismatches
from pdserve.kvtransfer.incoming import CHUNK_OVERHEAD_BYTES, TransferRefused, TransferState
from pdserve.kvtransfer.tp_shards import (
    HeadSlice,
    check_shardable,
    destinations,
    part_id,
    rank_addr,
    sources,
)
from tests.kvtransfer.test_transfer_table import BB, BLOCKS, chunk, make_table, open_msg

HEADS, BLOCK_SIZE, HEAD = 4, 4, 8
PAIRS = [(1, 1), (2, 1), (1, 2), (2, 2), (2, 4), (4, 2), (4, 1), (1, 4)]


@pytest.mark.parametrize(("src_tp", "dst_tp"), PAIRS)
def test_every_decode_rank_gets_each_of_its_heads_from_exactly_one_prefill_rank(src_tp, dst_tp):
    for d in range(dst_tp):
        got = []
        for s, take in sources(d, dst_tp, src_tp, HEADS).items():
            assert d in destinations(s, src_tp, dst_tp, HEADS)  # the sender pushes where the receiver waits
            got += [(d * HEADS // dst_tp + take.dst_first + i, s * HEADS // src_tp + take.src_first + i)
                    for i in range(take.count)]
        assert sorted(got) == [(h, h) for h in range(d * HEADS // dst_tp, (d + 1) * HEADS // dst_tp)]


def test_equal_tp_sizes_move_rank_to_rank_and_tp_1_keeps_the_transfer_id():
    assert [sources(d, 2, 2, HEADS) for d in range(2)] == [{0: HeadSlice(0, 0, 2)}, {1: HeadSlice(0, 0, 2)}]
    assert part_id("req-1", 0, 1) == "req-1" and part_id("req-1", 1, 2) == "req-1/tp1"
    assert rank_addr("10.0.0.5:7000", 0) == "10.0.0.5:7000" and rank_addr("10.0.0.5:7000", 3) == "10.0.0.5:7003"
    assert rank_addr("[::1]:7000", 1) == "[::1]:7001"


def test_a_tp_size_that_does_not_split_the_heads_is_refused_with_the_numbers():
    check_shardable(4, 2)
    with pytest.raises(ValueError, match="3 KV heads split evenly over the tensor-parallel size 2"):
        check_shardable(3, 2)


def cpu_cache(blocks: int, heads: int) -> torch.Tensor:
    return torch.randn(blocks, heads, BLOCK_SIZE, 2 * HEAD)


def gpu_like_cache(blocks: int, heads: int) -> torch.Tensor:
    return torch.randn(2, blocks, BLOCK_SIZE, heads, HEAD)


def heads_of(kv: torch.Tensor, first: int, count: int) -> torch.Tensor:
    return kv[:, first : first + count] if kv.shape[0] != 2 else kv[:, :, :, first : first + count]


@pytest.mark.parametrize("make", [cpu_cache, gpu_like_cache])
@pytest.mark.parametrize(("src_tp", "dst_tp"), PAIRS)
def test_a_cache_re_sharded_between_tp_sizes_holds_every_rank_its_heads_byte_for_byte(make, src_tp, dst_tp):
    blocks, ids = 6, [4, 1, 2]
    whole = make(blocks, HEADS)  # one model's cache, as TP 1 would hold it
    src = {s: BlockLayout(heads_of(whole, s * HEADS // src_tp, HEADS // src_tp).contiguous(), blocks)
           for s in range(src_tp)}
    for d in range(dst_tp):
        dst_kv = make(8, HEADS // dst_tp).fill_(-7.0)
        dst = BlockLayout(dst_kv, 8)
        for s, take in sources(d, dst_tp, src_tp, HEADS).items():
            payload = memoryview(b"".join(src[s].read(ids)))
            copied = LoadPiece(dst, [0, 5, 7], payload, take, HEADS // src_tp).write()
            assert copied == len(ids) * dst.block_bytes * take.count // (HEADS // dst_tp)
        want = heads_of(whole, d * HEADS // dst_tp, HEADS // dst_tp)
        for got_id, want_id in zip([0, 5, 7], ids, strict=True):
            block = (lambda kv, i: kv[i]) if dst.block_dim == 0 else (lambda kv, i: kv[:, i])
            assert torch.equal(block(dst_kv, got_id), block(want, want_id))
        untouched = [b for b in range(8) if b not in (0, 5, 7)]
        assert (dst_kv[untouched] if dst.block_dim == 0 else dst_kv[:, untouched]).eq(-7.0).all()


def test_a_payload_sized_for_another_share_of_heads_is_refused():
    dst = BlockLayout(cpu_cache(4, 2), 4)
    one_head_blocks = memoryview(b"".join(BlockLayout(cpu_cache(4, 1), 4).read([0, 1])))
    with pytest.raises(ValueError, match="2 blocks hold"):
        LoadPiece(dst, [0, 1], one_head_blocks, HeadSlice(0, 0, 2), 2).write()


def fp(heads: int, tp: int, model: str = "m") -> KVFingerprint:
    return KVFingerprint(model, "float32", BLOCK_SIZE, layout_name("cpu", 0, (heads, BLOCK_SIZE, 2 * HEAD), 0),
                         num_layers=2, num_kv_heads=heads, head_size=HEAD, tp_size=tp)


def test_ranks_of_different_tp_sizes_agree_on_the_fingerprint_when_the_model_heads_match():
    assert fp(4, 1).kv_layout == fp(2, 2).kv_layout == "cpu:block_dim=0:block_shape=(heads, 4, 16)"
    assert mismatches(fp(4, 1), fp(2, 2)) == [] and mismatches(fp(1, 4), fp(2, 2)) == []
    assert mismatches(fp(4, 1), fp(2, 1)) == ["KV heads: receiver=4 x 1 ranks sender=2 x 1 ranks"]
    assert mismatches(fp(4, 1), fp(2, 2, model="other")) == ["model: receiver='m' sender='other'"]
    assert fp(2, 2).block_bytes_per_layer == fp(4, 1).block_bytes_per_layer // 2
    assert KVFingerprint.from_proto(fp(2, 2).to_proto()) == fp(2, 2)
    old_sender = fp(4, 1).to_proto()
    old_sender.ClearField("tp_size")  # a peer that does not set it holds every head
    assert KVFingerprint.from_proto(old_sender).tp_size == 1


def test_tp_sizes_travel_in_the_params_and_nonsense_is_refused():
    send = params.parse(params.for_prefill("t", "h:1", dest_tp=4))
    recv = params.parse(params.for_decode("t", src_tp=2))
    assert (send.dest_tp, recv.src_tp) == (4, 2)
    assert "dest_tp" not in params.for_prefill("t", "h:1")[params.KEY]  # TP 1: the params as before
    for bad in (0, -1, True, "2", params.MAX_TP + 1):
        with pytest.raises(ValueError, match="tensor-parallel size"):
            params.parse({params.KEY: {"op": "recv", "transfer_id": "t", "src_tp": bad}})


def test_one_requests_reports_from_two_ranks_merge_into_one_that_failed_if_either_did():
    ok = TransferReport("t", "DONE", tokens=40, bytes=100, exposed_ms=5.0, start_unix_ns=10, ready_unix_ns=50)
    late = TransferReport("t", "DONE", tokens=40, bytes=100, exposed_ms=9.0, start_unix_ns=12, ready_unix_ns=80)
    bad = TransferReport("t", "FAILED", tokens=0, bytes=0, error="checksum")
    merged = GrpcWorkerMetadata({"r": ok}).aggregate(GrpcWorkerMetadata({"r": late, "q": ok}))
    assert merged.reports["r"] == TransferReport("t", "DONE", tokens=40, bytes=200, exposed_ms=9.0,
                                                 start_unix_ns=10, ready_unix_ns=80)
    assert merged.reports["q"] == ok
    failed = ok.merge(bad)
    assert (failed.state, failed.tokens, failed.error) == ("FAILED", 0, "checksum")


def test_a_transfer_takes_chunks_sized_for_the_senders_share_of_heads_and_no_other():
    """A sender of another TP size holds fewer heads per block: its chunks are sized by the
    fingerprint it opened with, and a second stream opening the transfer with another share is refused."""
    table = make_table()
    half = KVFingerprint("m", "float32", block_size=4, kv_layout="cpu", num_layers=2, num_kv_heads=1, head_size=4,
                         tp_size=2)
    msg = open_msg()
    msg.fingerprint.CopyFrom(half.to_proto())
    t = table.open(msg, now_s=0.0)
    assert t.block_bytes == BB // 2 and table.reserved_bytes == BLOCKS * (BB // 2 + CHUNK_OVERHEAD_BYTES) * 2
    with pytest.raises(TransferRefused, match="disagrees"):
        table.open(open_msg(), now_s=0.1)  # another stream, claiming whole blocks
    hdr, payload, nbytes = chunk(0, 0, 1, size=BB // 2)
    assert table.add_chunk(t, hdr, payload, nbytes)
    hdr, payload, nbytes = chunk(0, 1, 1)  # a whole block's bytes: not this transfer's size
    with pytest.raises(TransferRefused, match="payload"):
        table.add_chunk(t, hdr, payload, nbytes)
    assert t.state is TransferState.FAILED
