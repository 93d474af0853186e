"""The connector's worker side between two workers on CPU tensors in vLLM's GPU layout, with the
engine's own calls (bind, save_kv_layer per layer, wait_for_save, transfer results): in place
(a CPU cache), and through the LayerStager a GPU cache uses (here on CPU tensors, copies that land
at once). Either way the blocks arrive byte for byte, the load is reported once, and the copies
counted per byte are what the path makes."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer.connector_meta import GrpcConnectorMetadata, LoadJob, SendJob
from pdserve.kvtransfer.connector_worker import WorkerSide
from pdserve.kvtransfer.layer_stager import LayerStager

LAYERS, BLOCKS, BS, HEADS, HEAD = 3, 10, 4, 2, 64
SETTINGS = KVTransferSettings(secret="worker-test-secret", chunk_bytes=2 * 2 * BS * HEADS * HEAD * 4, tune_malloc=False,
                              same_node=False)


def caches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.attn": torch.randn(2, BLOCKS, BS, HEADS, HEAD, generator=g) for i in range(LAYERS)}


def worker(kv: dict[str, torch.Tensor], produce: bool, staged: bool) -> WorkerSide:
    w = WorkerSide(SETTINGS, model_id="tiny", block_size=BS, num_kv_heads=HEADS, head_size=HEAD, num_blocks=BLOCKS,
                   produce=produce, consume=not produce)
    w.register_kv_caches(kv)
    if staged:  # what register_kv_caches does for a device cache
        w.stager = LayerStager(torch.device("cpu"))
    return w


@pytest.mark.parametrize("staged", [False, True], ids=["in_place", "staged"])
def test_a_prompts_blocks_move_between_workers_and_each_path_counts_its_copies(staged):
    src, dst = caches(50), caches(51)
    prefill, decode = worker(src, produce=True, staged=staged), worker(dst, produce=False, staged=staged)
    try:
        src_ids, dst_ids = [7, 2, 3, 9], [0, 5, 6, 1]
        decode.bind(GrpcConnectorMetadata(loads=[LoadJob("r-decode", "t1", 10_000, 4 * BS, 0, dst_ids)]))
        prefill.bind(GrpcConnectorMetadata(sends=[SendJob("r-prefill", "t1", decode.receiver.address, 10_000, 4 * BS,
                                                          0, src_ids, is_last=True)]))
        for name, kv in src.items():
            prefill.save_kv_layer(name, kv)
        prefill.wait_for_save()
        deadline = time.monotonic() + 10
        while not (loaded := decode.transfer_results(set())[1]):
            assert time.monotonic() < deadline, "the load was never reported"
            time.sleep(0.01)
        assert loaded == {"r-decode"}
        (report,) = decode.take_reports().values()
        assert report.state == "DONE" and report.tokens == 4 * BS, report.error
        for name in src:
            assert torch.equal(dst[name][:, dst_ids], src[name][:, src_ids])
        while prefill.transfer_results({"r-prefill"})[0] != {"r-prefill"}:
            assert time.monotonic() < deadline, "the send never finished"
            time.sleep(0.01)
        sent, got = prefill.counters, decode.counters
        payload = LAYERS * len(src_ids) * 2 * BS * HEADS * HEAD * 4
        assert sent["sent_bytes"] == got["received_bytes"] == report.bytes == payload
        copies = 2 if staged else 1  # staged: off the device, then into the frame; onto the host, then the device
        assert copies * payload <= sent["send_copies_bytes"] < (copies + 0.05) * payload
        assert got["load_copies_bytes"] == copies * payload
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_a_steps_chunks_wait_for_its_forward_to_end_and_then_go_without_waiting_for_the_prompts_end():
    """Chunked prefill over two steps: what a step computed goes when its forward ends (one
    wake-up of the sender per step, not one per layer), before the prompt's last step."""
    roomy = SETTINGS.model_copy(update={"chunk_bytes": 16 * 2 * BS * HEADS * HEAD * 4})
    src, dst = caches(60), caches(61)
    prefill = WorkerSide(roomy, model_id="tiny", block_size=BS, num_kv_heads=HEADS, head_size=HEAD, num_blocks=BLOCKS,
                         produce=True, consume=False)
    prefill.register_kv_caches(src)
    decode = worker(dst, produce=False, staged=False)
    try:
        src_ids, dst_ids = [7, 2, 3, 9], [0, 5, 6, 1]
        decode.bind(GrpcConnectorMetadata(loads=[LoadJob("r-decode", "t2", 10_000, 4 * BS, 0, dst_ids)]))
        for first, is_last in ((0, False), (2, True)):
            prefill.bind(GrpcConnectorMetadata(sends=[SendJob("r-prefill", "t2", decode.receiver.address, 10_000,
                                                              4 * BS, first, src_ids[first:first + 2], is_last)]))
            for name, kv in src.items():
                prefill.save_kv_layer(name, kv)
            time.sleep(0.2)
            assert decode.receiver.stats()["chunks"] == first // 2 * LAYERS  # this step's are held
            prefill.wait_for_save()
            deadline = time.monotonic() + 10
            while decode.receiver.stats()["chunks"] < (first // 2 + 1) * LAYERS:
                assert time.monotonic() < deadline, f"the chunks of the step from block {first} never arrived"
                time.sleep(0.01)
        while not decode.transfer_results(set())[1]:
            assert time.monotonic() < deadline, "the load was never reported"
            time.sleep(0.01)
        (report,) = decode.take_reports().values()
        assert report.state == "DONE", report.error
        for name in src:
            assert torch.equal(dst[name][:, dst_ids], src[name][:, src_ids])
    finally:
        prefill.shutdown()
        decode.shutdown()
