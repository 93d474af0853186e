"""A disaggregated service whose prefill and decode engines each run on two tensor-parallel ranks:
the controller learns each instance's TP size from its reports, the ingress tells the prefill
replica how many decode ranks to push to and the decode replica how many parts to wait for, each
decode rank listens on its own port, and the greedy float32 answers are a plain engine's, with
every KV head moved (not recomputed)."""

from __future__ import annotations

import pytest

from pdserve.bench.engine_process import EngineProcess, EngineSpec
from pdserve.dense_checkpoint import KV_HEADS, prepare_dense_model
from tests.deployments.service_fixtures import routing_decisions, running_service, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

MAX_TOKENS = 10
BLOCK_SIZE = 32  # the CPU attention kernel takes multiples of 32 for this model's 32-wide heads
LAYERS, HEAD_SIZE, FLOAT32 = 2, 32, 4  # `dense_checkpoint`'s model
PROMPTS = {  # token ids of the default tokenizer; no two share a block, so the decode engine holds none
    "short": [504, 3458, 282, 4649, 314, 2807, 30, 1073, 2521, 260, 3135, 28, 6079],
    "long": [(k * 37) % 9000 + 100 for k in range(150)],
}


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(prepare_dense_model())


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, str]:
    plain = EngineProcess(EngineSpec(model_dir, "plain", cpu_bind="0-1", block_size=BLOCK_SIZE))
    try:
        return {name: plain.generate({"prompt_token_ids": ids, "max_tokens": MAX_TOKENS})["text"]
                for name, ids in PROMPTS.items()}
    finally:
        plain.stop()


def test_tp_2_prefill_and_decode_engines_serve_the_plain_engines_answers_with_the_kv_moved(model_dir, reference):
    tp2 = {"cpu_binds": ["0|1"], "engine_args": {"tensor_parallel_size": 2, "block_size": BLOCK_SIZE}}
    cfg = service_config(prefill=tp2, decode=tp2)
    with running_service(cfg, model_dir, num_cpus=4) as svc:
        client = openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        answers = {name: client.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
                   for name, ids in PROMPTS.items()}
        routed = routing_decisions(svc)
    for name, answer in answers.items():
        assert answer.choices[0].text == reference[name], name
        kv = answer.usage.model_extra["kv_transfer"]
        blocks = -(-len(PROMPTS[name]) // BLOCK_SIZE)  # the prompt's, in whole blocks
        # Both decode ranks loaded their parts: every head of every block, nothing recomputed.
        assert kv["state"] == "DONE", kv
        assert kv["bytes"] == blocks * LAYERS * 2 * KV_HEADS * BLOCK_SIZE * HEAD_SIZE * FLOAT32, kv
        assert "local prefill" not in routed[answer.id.removeprefix("cmpl-")], routed
