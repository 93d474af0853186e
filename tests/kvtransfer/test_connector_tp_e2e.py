"""Prefill and decode vLLM engines of different tensor-parallel sizes hand a prompt's KV over rank
by rank (each prefill rank pushes its share of the heads to the decode ranks that hold them), and
the decode engine's greedy float32 answer is a plain engine's, token for token."""

from __future__ import annotations

import uuid

import pytest

from pdserve.bench.engine_process import EnginePair, EngineProcess, EngineSpec
from pdserve.dense_checkpoint import KV_HEADS, prepare_dense_model
from pdserve.kvtransfer import params
from pdserve.ports import free_port

pytestmark = pytest.mark.slow

SECRET = "tp-e2e-secret"
MAX_TOKENS = 12
BLOCK_SIZE = 32  # the CPU attention kernel takes multiples of 32
LAYERS, HEAD_SIZE, FLOAT32 = 2, 32, 4  # `dense_checkpoint`'s model
TEXT = ("Rivers carve valleys over millions of years, carrying sand and stones from the mountains down "
        "to the sea, where deltas grow and shift with every flood. ")
LENGTHS = [5, 47, 150]


def cores(tp: int, alone: str) -> str:
    """A TP 2 engine's ranks take one core each; a one-worker engine the core it is given."""
    return "0|1" if tp == 2 else alone


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(prepare_dense_model())


@pytest.fixture(scope="module")
def prompts(model_dir) -> dict[int, list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = TEXT.split()
    # No two prompts share a block (the decode engine would hold it and the transfer leave it out).
    return {n: tokenizer(" ".join(words[k:] + words[:k]) * 10)["input_ids"][:n] for k, n in enumerate(LENGTHS)}


@pytest.fixture(scope="module")
def reference(model_dir, prompts) -> dict[int, list[int]]:
    plain = EngineProcess(EngineSpec(model_dir, "plain", cpu_bind="0-1", block_size=BLOCK_SIZE))
    try:
        return {n: plain.generate({"prompt_token_ids": ids, "max_tokens": MAX_TOKENS})["token_ids"]
                for n, ids in prompts.items()}
    finally:
        plain.stop()


# TP 2 -> TP 2 runs through a whole service: tests/deployments/test_tensor_parallel_e2e.py.
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)], ids=["tp2-to-tp1", "tp1-to-tp2"])
def test_kv_moved_between_tensor_parallel_sizes_gives_the_plain_engines_answer(model_dir, prompts, reference,
                                                                              prefill_tp, decode_tp):
    addr = f"127.0.0.1:{free_port(count=decode_tp)}"  # decode rank r listens at port + r
    prefill = EngineSpec(model_dir, "prefill", {"secret": SECRET}, cpu_bind=cores(prefill_tp, "0"),
                         tensor_parallel_size=prefill_tp, block_size=BLOCK_SIZE)
    decode = EngineSpec(model_dir, "decode", {"secret": SECRET, "listen_addr": addr}, cpu_bind=cores(decode_tp, "1"),
                        tensor_parallel_size=decode_tp, block_size=BLOCK_SIZE)
    with EnginePair(prefill, decode) as pair:
        for n, ids in prompts.items():
            tid = uuid.uuid4().hex
            pair.decode.send_generate({"prompt_token_ids": ids, "max_tokens": MAX_TOKENS,
                                       "kv_transfer_params": params.for_decode(tid, src_tp=prefill_tp)})
            first = pair.prefill.generate({"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params":
                                           params.for_prefill(tid, addr, dest_tp=decode_tp)})
            answer = pair.decode.result()
            report = answer["kv_transfer_params"][params.KEY]
            assert report["state"] == "DONE" and report["tokens"] == n, report
            # Every decode rank wrote its heads of every block: the whole prompt's KV, once.
            blocks = -(-n // BLOCK_SIZE)
            assert report["bytes"] == blocks * LAYERS * 2 * KV_HEADS * BLOCK_SIZE * HEAD_SIZE * FLOAT32, report
            assert answer["num_cached_tokens"] >= n - 1  # loaded, not recomputed
            assert first["token_ids"][0] == reference[n][0]
            assert answer["token_ids"] == reference[n]
        assert pair.decode.call("free_blocks") == pair.decode.idle_free_blocks
        assert pair.prefill.call("free_blocks") == pair.prefill.idle_free_blocks


def test_a_decode_engine_told_of_a_prefill_tp_size_that_does_not_split_the_heads_computes_the_prompt(
        model_dir, prompts, reference):
    """3 ranks cannot split 4 heads: no part can come, so the load fails at once (not after its lease)
    and vLLM recomputes the prompt; the answer is still the plain engine's."""
    addr = f"127.0.0.1:{free_port()}"
    decode = EngineProcess(EngineSpec(model_dir, "decode", {"secret": SECRET, "listen_addr": addr}, cpu_bind="1",
                                      block_size=BLOCK_SIZE))
    try:
        answer = decode.generate({"prompt_token_ids": prompts[47], "max_tokens": MAX_TOKENS,
                                  "kv_transfer_params": params.for_decode(uuid.uuid4().hex, src_tp=3)}, timeout_s=120)
        report = answer["kv_transfer_params"][params.KEY]
        assert report["state"] == "FAILED" and "does not split the model's 4 KV heads" in report["error"], report
        assert answer["token_ids"] == reference[47]
    finally:
        decode.stop()
