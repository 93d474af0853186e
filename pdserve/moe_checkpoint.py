"""The project's test MoE model: a small Mixtral with random weights from a fixed seed.

vLLM loads it the normal way (`MixtralForCausalLM`, HF format, the default model's
tokenizer), so the expert buffer is tested on the same fused-MoE layers a real Mixtral uses.

Router skew. Random routers spread tokens evenly over the experts; real traces do not (the
MoE-deployment paper's decoders send most tokens to a few experts). The checkpoint gets a
skew the way real models carry a bias without a bias term, through a "massive activation":
- residual channel 0 holds the same value for every token (the embedding's column 0 is 1,
  and no attention or expert output writes channel 0), so after the pre-MoE norm it is a
  near-constant input to the router;
- the router's column 0 then acts as a per-expert logit bias, set to `ROUTER_SKEW` times
  the log of a Zipf(`ZIPF_EXPONENT`) popularity, in a different random expert order per
  layer, scaled by the channel's measured mean so every layer gets the same bias;
- the other channels still vary with the token, so which experts a token gets varies too.
`routing.json` in the checkpoint records the share of routed tokens the most popular
quarter, half and three quarters of each layer's experts receive on a sample text.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pdserve.model_store import (
    build_checkpoint,
    generated_is_complete,
    mark_generated,
    prepare_default_model,
)

logger = logging.getLogger(__name__)

MOE_MODEL_NAME = "pdserve-tiny-mixtral"
GENERATOR_VERSION = 1
SEED = 0
NUM_EXPERTS = 16
TOP_K = 2
ZIPF_EXPONENT = 1.2
ROUTER_SKEW = 1.5
WEIGHT_STD = 0.08
"""Wider than transformers' 0.02 default: with 0.02 a random model repeats one token forever,
which would exercise few routing patterns."""
SAMPLE_TEXT = (
    "The capital of France is Paris, known for its museums and cafes.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time in a small village by the sea there lived an old fisherman.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The stock market fell sharply on Monday after the central bank raised rates.",
    "In 1969, astronauts landed on the Moon for the first time and walked on its surface.",
)


def prepare_moe_model(force: bool = False) -> Path:
    """The test MoE checkpoint's directory, generated on first use (about 10 s, 0.5 GB)."""
    tokenizer_dir = prepare_default_model(progress=False)
    return build_checkpoint(MOE_MODEL_NAME, lambda path: generated_is_complete(path, GENERATOR_VERSION, SEED),
                            lambda work: _generate(work, tokenizer_dir), force)


def routing_shares(checkpoint: Path) -> list[dict[str, float]]:
    """Per layer: the share of routed tokens the top 25/50/75% of its experts get (sample text)."""
    return json.loads((checkpoint / "routing.json").read_text())["layers"]


def _generate(out_dir: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
        max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=WEIGHT_STD,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32", architectures=["MixtralForCausalLM"],
    )
    torch.manual_seed(SEED)
    model = MixtralForCausalLM(config).eval()
    sample = tokenizer(list(SAMPLE_TEXT), return_tensors="pt", padding=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.experts.down_proj[:, 0, :] = 0.0
        channel = _router_input_channel0(model, sample)
        order = torch.Generator().manual_seed(SEED + 1)
        popularity = torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float32) ** -ZIPF_EXPONENT
        log_p = torch.log(popularity / popularity.sum())
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate.weight[:, 0] = ROUTER_SKEW * log_p[torch.randperm(NUM_EXPERTS, generator=order)] / channel[i]
        shares = _routing_shares(model, sample)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "routing.json").write_text(json.dumps({"sample_texts": len(SAMPLE_TEXT), "layers": shares}, indent=2))
    for i, s in enumerate(shares):
        logger.info("%s layer %d: top quarter of experts get %.0f%% of tokens, top half %.0f%%", MOE_MODEL_NAME, i,
                    100 * s["top_25"], 100 * s["top_50"])
    mark_generated(out_dir, GENERATOR_VERSION, SEED)


def _router_input_channel0(model, sample) -> list[float]:
    """Mean |channel 0| of each layer's router input on the sample (the bias channel's scale)."""
    seen: dict[int, float] = {}
    hooks = [layer.mlp.gate.register_forward_pre_hook(
        lambda _m, args, i=i: seen.__setitem__(i, args[0][..., 0].abs().mean().item()))
        for i, layer in enumerate(model.model.layers)]
    try:
        model(**sample)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(model.model.layers))]


def _routing_shares(model, sample) -> list[dict[str, float]]:
    import torch

    out = model(**sample, output_router_logits=True)
    mask = sample["attention_mask"].flatten().bool()
    shares = []
    for logits in out.router_logits:
        chosen = logits[mask].topk(TOP_K, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=NUM_EXPERTS).sort(descending=True).values.float()
        cumulative = counts.cumsum(0) / counts.sum()
        shares.append({f"top_{q}": round(cumulative[NUM_EXPERTS * q // 100 - 1].item(), 3) for q in (25, 50, 75)})
    return shares
