"""The project's tensor-parallel test model: a small Llama with random weights from a fixed seed.

The default model's 3 KV heads split over no TP size but 1 (or 3); this one has 4 KV heads (8
query heads), so prefill and decode engines of TP 1, 2 and 4 each hold an even share, and the
KV layer's re-sharding between TP sizes runs on real engines (`tests/kvtransfer/test_connector_tp_e2e.py`).
It uses the default model's tokenizer, so prompts are real text.
"""

from __future__ import annotations

from pathlib import Path

from pdserve.model_store import (
    build_checkpoint,
    generated_is_complete,
    mark_generated,
    prepare_default_model,
)

DENSE_MODEL_NAME = "pdserve-tiny-llama-4kv"
GENERATOR_VERSION = 1
SEED = 0
KV_HEADS = 4
WEIGHT_STD = 0.08
"""Wider than transformers' 0.02 default, so that greedy answers vary with the prompt (a narrow
random model repeats one token), and their logits are far apart, so the order of a TP all-reduce's
float32 sums does not flip a greedy token."""


def prepare_dense_model(force: bool = False) -> Path:
    """The test checkpoint's directory, generated on first use (a few seconds, about 60 MB)."""
    tokenizer_dir = prepare_default_model(progress=False)
    return build_checkpoint(DENSE_MODEL_NAME, lambda path: generated_is_complete(path, GENERATOR_VERSION, SEED),
                            lambda work: _generate(work, tokenizer_dir), force)


def _generate(out_dir: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=KV_HEADS, head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=True, initializer_range=WEIGHT_STD, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    mark_generated(out_dir, GENERATOR_VERSION, SEED)
