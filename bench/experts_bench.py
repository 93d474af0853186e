"""`pdserve bench experts`: decode throughput and expert hit rate with a share of each MoE
layer's experts resident, per eviction policy, against all experts resident in the same run.

One real vLLM engine runs in this process (so its workers take buffering calls directly);
buffering is installed, measured and removed for each setting in turn. Every setting's
greedy output is compared token for token with the all-resident run's.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

from pydantic import BaseModel, Field

from pdserve.config.experts import WORKER_EXTENSION, EvictionPolicy, ExpertBufferConfig

POLICIES: tuple[EvictionPolicy, ...] = ("lifo", "lru", "pinned_hot")
_TEXT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map handles collisions, with an example in Python.",
    "What were the main causes of the French Revolution?",
    "Summarize the plot of a heist movie in three sentences.",
    "List five tips for growing tomatoes on a balcony.",
    "Describe the water cycle to a ten-year-old.",
    "Translate 'good morning, how are you' into Spanish and French.",
    "Why is the sky blue? Answer like a physics teacher.",
)


class ExpertBenchSettings(BaseModel):
    resident_pct: list[int] = Field(default_factory=lambda: [25, 50, 75, 100])
    """Shares of each layer's experts kept resident (rounded up to whole experts, at least top-k)."""
    policies: list[EvictionPolicy] = Field(default_factory=lambda: list(POLICIES))
    batch: int = Field(4, ge=1)
    """Sequences decoded together (a decode replica's running batch)."""
    output_tokens: int = Field(128, ge=1)
    repeats: int = Field(5, ge=1)
    """Timed runs per setting; tokens/s is their median."""
    cpu_bind: str = "0-1"
    """Cores for the engine (VLLM_CPU_OMP_THREADS_BIND)."""


def _slots(pct: int, num_experts: int, top_k: int) -> int:
    return min(num_experts, max(top_k, math.ceil(num_experts * pct / 100)))


def run(model: str, settings: ExpertBenchSettings, progress=None) -> dict[str, Any]:
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                      VLLM_CPU_OMP_THREADS_BIND=settings.cpu_bind, HF_HUB_OFFLINE="1")
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from pdserve.bench.hardware import hardware
    from pdserve.controller.hot_experts import hot_set, hot_size

    hf = AutoConfig.from_pretrained(model)
    num_experts, top_k = hf.num_local_experts, hf.num_experts_per_tok
    llm = LLM(model, dtype="float32", enforce_eager=True, max_model_len=1024, worker_extension_cls=WORKER_EXTENSION)
    tokenizer = llm.get_tokenizer()
    sampling = SamplingParams(max_tokens=settings.output_tokens, temperature=0.0, ignore_eos=True)

    def batch(run_index: int) -> list[dict]:
        texts = [_TEXT[(run_index * settings.batch + i) % len(_TEXT)] for i in range(settings.batch)]
        return [{"prompt_token_ids": tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                                  add_generation_prompt=True, return_dict=False)}
                for t in texts]

    def timed(run_index: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        outs = llm.generate(batch(run_index), sampling, use_tqdm=False)
        elapsed = time.perf_counter() - start
        return settings.batch * settings.output_tokens / elapsed, [list(o.outputs[0].token_ids) for o in outs]

    def rpc(method: str, *args) -> Any:
        return llm.collective_rpc(method, args=args)[0]

    try:
        timed(0)  # engine warm-up, not counted
        baseline_runs = [timed(r) for r in range(settings.repeats)]
        reference = [outs for _, outs in baseline_runs]
        results = []
        for pct in settings.resident_pct:
            slots = _slots(pct, num_experts, top_k)
            for policy in settings.policies:
                baseline_runs.append(timed(0))  # all-resident between settings: drift shows in its runs
                cfg = ExpertBufferConfig(slots=slots, policy=policy)
                rpc("pdserve_install_expert_buffers", cfg.model_dump_json())
                try:
                    timed(settings.repeats)  # fills the slots the way this workload uses them
                    if policy == "pinned_hot":  # what the controller would push: last window's hot set
                        rpc("pdserve_set_hot_experts", hot_set(rpc("pdserve_expert_stats")["activations"],
                                                                     hot_size(slots, top_k)))
                    rpc("pdserve_reset_expert_stats")
                    runs = [timed(r) for r in range(settings.repeats)]
                    stats = rpc("pdserve_expert_stats")
                finally:
                    rpc("pdserve_uninstall_expert_buffers")
                results.append({
                    "resident_pct": pct, "slots": slots, "policy": policy,
                    "tokens_per_s": statistics.median(t for t, _ in runs),
                    "identical_to_all_resident": [outs for _, outs in runs] == reference,
                    **{k: stats[k] for k in ("hit_rate", "hits", "misses", "bytes_moved_per_token",
                                             "stall_s_per_token", "device_bytes_held")},
                })
                if progress:
                    progress(1)
    finally:
        llm.llm_engine.engine_core.shutdown()
    baseline = statistics.median(t for t, _ in baseline_runs)
    for r in results:
        r["throughput_vs_all_resident"] = r["tokens_per_s"] / baseline
    return {
        "model": os.path.basename(model.rstrip("/")), "num_experts": num_experts, "top_k": top_k,
        "settings": settings.model_dump(), "hardware": hardware(),
        "copies": "host-to-device (CUDA)" if _on_gpu() else "memory-to-memory on the CPU (no device)",
        "all_resident_tokens_per_s": baseline,
        "all_resident_tokens_per_s_runs": [t for t, _ in baseline_runs],
        "results": results,
        "goal_50pct": _goal(results),
    }


def _on_gpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def _goal(results: list[dict]) -> dict:
    """The issue's goal at 50% resident on skewed routing: hit rate >= 0.9 and >= 0.8x throughput."""
    at_half = [r for r in results if r["resident_pct"] == 50]
    return {r["policy"]: {"hit_rate": r["hit_rate"], "throughput_vs_all_resident": r["throughput_vs_all_resident"],
                          "met": r["hit_rate"] >= 0.9 and r["throughput_vs_all_resident"] >= 0.8}
            for r in at_half}
