"""The generated test MoE model: a real Mixtral config, the default model's tokenizer, a fixed
seed, and routers skewed the way the checkpoint says."""

import hashlib

import pytest

from pdserve import moe_checkpoint

pytestmark = pytest.mark.slow


def test_the_checkpoint_is_a_seeded_skewed_mixtral_with_the_default_tokenizer(tmp_path, monkeypatch) -> None:
    import json

    from pdserve.model_store import prepare_default_model

    tokenizer_dir = prepare_default_model(progress=False)
    digests = []
    for cache in ("one", "two"):
        monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(tmp_path / cache))
        monkeypatch.setattr(moe_checkpoint, "prepare_default_model", lambda progress=False: tokenizer_dir)
        path = moe_checkpoint.prepare_moe_model()
        digests.append(hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]  # same seed, same weights
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (16, 2)
    vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (path, tokenizer_dir)]
    assert vocab[0] == vocab[1]
    for layer in moe_checkpoint.routing_shares(path):  # skewed: half the experts take most tokens
        assert 0.85 <= layer["top_50"] < 1.0 and layer["top_25"] > 0.5
    assert moe_checkpoint.prepare_moe_model() == path  # complete: not generated again
