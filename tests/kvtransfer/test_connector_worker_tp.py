"""The connector's worker side between tensor-parallel ranks (CPU tensors in vLLM's GPU layout, the
engine's own calls, real gRPC between the ranks): a model's 2 KV heads go from a TP 2 prefill to a
TP 1 decode and from TP 1 to TP 2, each decode rank ends with exactly its heads, and a part that
never comes fails the whole load."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer.connector_meta import GrpcConnectorMetadata, LoadJob, SendJob
from pdserve.kvtransfer.connector_worker import WorkerSide
from pdserve.ports import free_port

LAYERS, BLOCKS, BS, HEADS, HEAD = 2, 8, 4, 2, 16
SRC_IDS, DST_IDS = [5, 1, 2], [0, 6, 7]


def settings(listen_addr: str = "127.0.0.1:0", lease_ms: int = 30_000) -> KVTransferSettings:
    return KVTransferSettings(secret="tp-worker-secret", listen_addr=listen_addr, tune_malloc=False, same_node=False,
                              max_lease_ms=lease_ms)


def model_cache(seed: int) -> dict[str, torch.Tensor]:
    """Every head of every layer, as a TP 1 engine holds them."""
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.attn": torch.randn(2, BLOCKS, BS, HEADS, HEAD, generator=g) for i in range(LAYERS)}


def shard(kv: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    per = HEADS // tp
    return {name: t[:, :, :, rank * per : (rank + 1) * per].contiguous() for name, t in kv.items()}


def shards(kv: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    return [shard(kv, rank, tp) for rank in range(tp)] if tp > 1 else [kv]


def ranks(caches: list[dict[str, torch.Tensor]], produce: bool, listen_addr: str = "127.0.0.1:0") -> list[WorkerSide]:
    """One engine's workers, rank by rank, each on its share of the cache."""
    out, tp = [], len(caches)
    for rank, kv in enumerate(caches):
        w = WorkerSide(settings(listen_addr), model_id="tiny", block_size=BS, num_kv_heads=HEADS // tp, head_size=HEAD,
                       num_blocks=BLOCKS, produce=produce, consume=not produce, tp_rank=rank, tp_size=tp)
        w.register_kv_caches(kv)
        out.append(w)
    return out


def wait_loaded(decode: list[WorkerSide], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(range(len(decode)))
    while pending:
        assert time.monotonic() < deadline, f"ranks {sorted(pending)} never reported the load"
        pending = {r for r in pending if decode[r].transfer_results(set())[1] != {"r-decode"}}
        time.sleep(0.01)


def push(prefill: list[WorkerSide], caches: list[dict[str, torch.Tensor]], dest: str, dest_tp: int) -> None:
    """One step of each prefill rank computing the whole prompt: bind, each layer saved, end."""
    for w, kv in zip(prefill, caches, strict=True):
        w.bind(GrpcConnectorMetadata(sends=[SendJob("r-prefill", "t1", dest, 10_000, 3 * BS, 0, SRC_IDS, True,
                                                    dest_tp=dest_tp)]))
        for name, t in kv.items():
            w.save_kv_layer(name, t)
        w.wait_for_save()


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (2, 2)])
def test_each_decode_rank_ends_with_its_heads_of_every_block(src_tp, dst_tp):
    src, dst = model_cache(1), model_cache(2)
    addr = f"127.0.0.1:{free_port(count=dst_tp)}"
    dst_shards, src_shards = shards(dst, dst_tp), shards(src, src_tp)
    decode = ranks(dst_shards, produce=False, listen_addr=addr)
    prefill = ranks(src_shards, produce=True)
    try:
        assert [w.receiver.address.rpartition(":")[2] for w in decode] == [
            str(int(addr.rpartition(":")[2]) + r) for r in range(dst_tp)]
        for w in decode:
            w.bind(GrpcConnectorMetadata(loads=[LoadJob("r-decode", "t1", 10_000, 3 * BS, 0, DST_IDS, src_tp=src_tp)]))
        push(prefill, src_shards, addr, dst_tp)
        wait_loaded(decode)
        per = HEADS // dst_tp
        for rank, w in enumerate(decode):
            (report,) = w.take_reports().values()
            assert report.state == "DONE" and report.tokens == 3 * BS, report.error
            assert report.bytes == LAYERS * len(SRC_IDS) * 2 * BS * per * HEAD * 4  # its heads, no more
            for name in src:
                want = src[name][:, SRC_IDS][:, :, :, rank * per : (rank + 1) * per]
                assert torch.equal(dst_shards[rank][name][:, DST_IDS], want)
        # Each prefill rank sends its heads once to every decode rank that holds any of them.
        sent = sum(w.counters["send_copies_bytes"] for w in prefill)  # payloads and their frames' headers
        payload = LAYERS * len(SRC_IDS) * 2 * BS * HEAD * 4 * max(HEADS, HEADS // src_tp * dst_tp)
        assert payload <= sent < 1.05 * payload
    finally:
        for w in prefill + decode:
            w.shutdown()


def test_a_load_waiting_for_a_part_that_never_comes_fails_and_reports_its_blocks_invalid():
    """A TP 2 prefill whose rank 1 died: rank 0's part lands, rank 1's lease runs out, and the decode
    engine recomputes (its blocks are reported invalid) instead of loading half the heads."""
    src, dst = model_cache(3), model_cache(4)
    (decode,) = ranks([dst], produce=False)
    prefill = ranks(shards(src, 2), produce=True)
    try:
        decode.bind(GrpcConnectorMetadata(loads=[LoadJob("r-decode", "t1", 300, 3 * BS, 0, DST_IDS, src_tp=2)]))
        push(prefill[:1], [shard(src, 0, 2)], decode.receiver.address, 1)
        deadline = time.monotonic() + 10
        while decode.transfer_results(set())[1] != {"r-decode"}:
            assert time.monotonic() < deadline, "the load never ended"
            time.sleep(0.02)
        (report,) = decode.take_reports().values()
        assert report.state == "FAILED" and "lease" in report.error, report
        assert decode.take_invalid_blocks() == set(DST_IDS)
        assert decode.receiver.stats()["reserved_bytes"] == 0  # rank 0's staged part is freed too
    finally:
        for w in prefill + [decode]:
            w.shutdown()


def test_a_part_of_another_share_of_heads_than_the_decode_was_told_fails_the_load_not_the_engine():
    """A sender whose fingerprint claims half the heads (a TP 2 rank) pushes to a decode request told
    its prefill runs on one worker: the fingerprints agree on the model, so the transfer is taken, but
    its blocks are half the size the load expects. The load fails and the blocks are recomputed."""
    src, dst = model_cache(5), model_cache(6)
    (decode,) = ranks([dst], produce=False)
    prefill = ranks(shards(src, 2), produce=True)
    try:
        decode.bind(GrpcConnectorMetadata(loads=[LoadJob("r-decode", "t1/tp0", 10_000, 3 * BS, 0, DST_IDS)]))
        push(prefill[:1], [shard(src, 0, 2)], decode.receiver.address, 1)
        wait_loaded([decode])
        (report,) = decode.take_reports().values()
        assert report.state == "FAILED" and "a prefill of TP size 1 sends" in report.error, report
        assert decode.take_invalid_blocks() == set(DST_IDS)
        assert torch.equal(dst["layers.0.attn"], model_cache(6)["layers.0.attn"])  # nothing written
    finally:
        for w in prefill + [decode]:
            w.shutdown()


def test_discarding_a_transfer_from_a_tp_2_prefill_frees_the_part_that_came_and_refuses_the_one_to_come():
    """An answer that ended at its first token: the ingress discards its KV on the decode engine,
    naming the prefill's TP size, so each of its parts goes (not the plain transfer id, which no part has)."""
    src, dst = model_cache(7), model_cache(8)
    (decode,) = ranks([dst], produce=False)
    prefill = ranks(shards(src, 2), produce=True)
    try:
        push(prefill[:1], [shard(src, 0, 2)], decode.receiver.address, 1)
        deadline = time.monotonic() + 10
        while decode.receiver.stats()["reserved_bytes"] == 0:
            assert time.monotonic() < deadline, "rank 0's part never came"
            time.sleep(0.02)
        assert decode.discard("t1", src_tp=2)
        assert decode.receiver.stats()["reserved_bytes"] == 0
        push(prefill[1:], [shard(src, 1, 2)], decode.receiver.address, 1)
        late = decode.receiver.take("t1/tp1")
        assert late.state.name == "FAILED" and "discarded" in late.error and late.staged_bytes == 0
        assert decode.receiver.stats()["reserved_bytes"] == 0
    finally:
        for w in prefill + [decode]:
            w.shutdown()
