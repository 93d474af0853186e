"""The disaggregated demo `make serve` runs until the Ray Serve service lands:
one prefill engine process and one decode engine process, each on its own core,
answering a few chat prompts with the KV moved over pdserve's gRPC layer."""

from __future__ import annotations

import secrets
import sys
import time

from pdserve.bench.engine_process import DisaggregatedPair
from pdserve.kvtransfer import params

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain in one sentence what a KV cache is in a transformer.",
]


def run(model: str, prompts: list[str], max_tokens: int = 48, out=sys.stdout) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    print("Starting a prefill engine (core 0) and a decode engine (core 1) ...", file=out)
    start = time.monotonic()
    with DisaggregatedPair(model, secrets.token_hex(16), log_level="WARNING") as pair:
        print(f"Engines ready in {time.monotonic() - start:.0f} s (KV receiver on {pair.addr}).\n", file=out)
        for prompt in prompts:
            ids = list(tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"])
            t0 = time.monotonic()
            res = pair.generate(ids, max_tokens)
            rep = res["kv_transfer_params"][params.KEY]
            print(f"> {prompt}\n{res['text'].strip()}", file=out)
            print(
                f"  [{len(ids)} prompt tokens; KV {rep['state']}: {rep['bytes'] / 2**20:.1f} MiB, "
                f"exposed {rep['exposed_ms']:.0f} ms of {rep['prefill_compute_ms']:.0f} ms prefill; "
                f"{time.monotonic() - t0:.1f} s total]\n",
                file=out,
            )
