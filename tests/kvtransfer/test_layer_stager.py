"""LayerStager, on CPU tensors in vLLM's GPU layout (the GPU adds a side stream and events to the
same code: bench/gpu_check.py runs it there): what it stages arrives byte for byte, the end of a
transfer follows its last chunk, and the copies it counts are the copies torch made."""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer.block_layout import BlockLayout, LoadPiece
from pdserve.kvtransfer.incoming import TransferState
from pdserve.kvtransfer.layer_stager import LayerStager
from tests.kvtransfer import test_transport
from tests.kvtransfer.copy_counter import CopyCounter
from tests.kvtransfer.test_transport import BB, BS, FP, WAIT_S, assert_arrived, caches

made, make_receiver, make_sender = test_transport.made, test_transport.make_receiver, test_transport.make_sender
"""The transport tests' fixtures: receivers and senders on 127.0.0.1, stopped after the test."""


@pytest.fixture
def stager():
    s = LayerStager(torch.device("cpu"))
    yield s
    s.close()


def stage_all(stager: LayerStager, t, src: list[torch.Tensor], ids: list[int], per_chunk: int) -> None:
    """What `save_kv_layer` does for one request's blocks, layer after layer, then `wait_for_save`."""
    for layer, kv in enumerate(src):
        lay = BlockLayout(kv, kv.shape[0])
        for i in range(0, len(ids), per_chunk):
            stager.send([t], layer, i, lay, ids[i : i + per_chunk])
    stager.finish(t, 1, 2)


def test_staged_blocks_arrive_identical_and_the_end_follows_the_last_chunk(stager, make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    src, ids = caches(9, seed=40), [7, 0, 3, 4, 5, 8]
    t = tx.open("staged", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    stage_all(stager, t, src, ids, per_chunk=2)
    assert t.finished_marked  # before the stager's thread reached the end: the engine must not abort it
    assert t.result.result(WAIT_S).state is TransferState.DONE
    assert_arrived(rx, "staged", src, ids)
    assert stager.counters["chunks"] == FP.num_layers * 3


def test_the_copies_it_counts_are_the_copies_torch_made(stager, make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    src, ids = caches(6, seed=41), [5, 1, 2]
    t = tx.open("counted", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    with CopyCounter() as copies:
        stage_all(stager, t, src, ids, per_chunk=2)
    assert t.result.result(WAIT_S).state is TransferState.DONE  # the end went after every chunk
    assert copies.copied_bytes == stager.counters["d2h_bytes"] == FP.num_layers * len(ids) * BB, copies.ops
    assert stager.counters["frame_bytes"] >= stager.counters["d2h_bytes"]  # payload plus headers


def test_a_transfer_that_failed_meanwhile_drops_its_staged_chunks_and_the_stager_goes_on(stager, make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    src, ids = caches(4, seed=42), [0, 1, 2, 3]
    gone = tx.open("gone", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    gone.abort("the request went away")
    stage_all(stager, gone, src, ids, per_chunk=4)
    kept = tx.open("kept", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    stage_all(stager, kept, src, ids, per_chunk=4)
    assert kept.result.result(WAIT_S).state is TransferState.DONE
    assert gone.result.result(WAIT_S).state is TransferState.FAILED and gone.chunks_sent == 0
    assert_arrived(rx, "kept", src, ids)


def test_a_load_lands_each_payload_in_its_blocks_and_counts_both_copies_it_makes(stager):
    src, dst = caches(6, seed=43), [torch.zeros(6, *c.shape[1:]) for c in caches(6, seed=0)]
    pieces = []
    for layer in range(FP.num_layers):
        src_lay, dst_lay = BlockLayout(src[layer], 6), BlockLayout(dst[layer], 6)
        pieces.append((dst_lay, [4, None], b"".join(src_lay.read([1, 2]))))  # block 2 is cached here
        pieces.append((dst_lay, [None], b"".join(src_lay.read([3]))))  # nothing to copy: skipped
    pieces = [LoadPiece(lay, ids, memoryview(payload)) for lay, ids, payload in pieces]
    with CopyCounter() as copies:
        pending = stager.load(pieces)
    assert pending.done()
    assert pending.written_bytes == FP.num_layers * BB and pending.host_bytes == FP.num_layers * 2 * BB
    assert copies.copied_bytes == pending.written_bytes + pending.host_bytes, copies.ops
    for layer in range(FP.num_layers):
        assert torch.equal(dst[layer][4], src[layer][1])
        assert not dst[layer][[0, 1, 2, 3, 5]].any()
