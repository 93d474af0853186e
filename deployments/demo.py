"""The disaggregated demo `make serve` runs until the Ray Serve service lands:
one prefill engine process and one decode engine process, each on its own core,
answering a few chat prompts with the KV moved over pdserve's gRPC layer."""

from __future__ import annotations

import secrets
import sys
import time
import uuid

from pdserve.deployments.engine_process import EngineProcess, EngineSpec, free_port
from pdserve.kvtransfer import params

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain in one sentence what a KV cache is in a transformer.",
]


def run(model: str, prompts: list[str], max_tokens: int = 48, out=sys.stdout) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    secret = secrets.token_hex(16)
    addr = f"127.0.0.1:{free_port()}"
    print(f"Starting a prefill engine (core 0) and a decode engine (core 1, KV receiver on {addr}) ...", file=out)
    start = time.monotonic()
    decode = EngineProcess(EngineSpec(model, "decode", {"secret": secret, "listen_addr": addr}, dtype="bfloat16", cpu_bind="1", log_level="WARNING"), wait=False)
    prefill = EngineProcess(EngineSpec(model, "prefill", {"secret": secret}, dtype="bfloat16", cpu_bind="0", log_level="WARNING"), wait=False)
    try:
        decode.wait_ready()
        prefill.wait_ready()
        print(f"Engines ready in {time.monotonic() - start:.0f} s.\n", file=out)
        for prompt in prompts:
            ids = list(tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"])
            tid = uuid.uuid4().hex
            t0 = time.monotonic()
            decode.send_generate({"prompt_token_ids": ids, "max_tokens": max_tokens, "kv_transfer_params": params.for_decode(tid)})
            prefill.generate({"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params": params.for_prefill(tid, addr)})
            res = decode.result()
            rep = res["kv_transfer_params"][params.KEY]
            print(f"> {prompt}\n{res['text'].strip()}", file=out)
            print(
                f"  [{len(ids)} prompt tokens; KV {rep['state']}: {rep['bytes'] / 2**20:.1f} MiB, "
                f"exposed {rep['exposed_ms']:.0f} ms of {rep['prefill_compute_ms']:.0f} ms prefill; "
                f"{time.monotonic() - t0:.1f} s total]\n",
                file=out,
            )
    finally:
        prefill.stop()
        decode.stop()
