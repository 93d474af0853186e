"""Request length workloads for `pdserve bench serve`: prompt and output token counts.

Built-in workloads are lognormal fits to lengths that published papers report for real
traffic (the `source` field of each says which); the spread (`sigma`) is our choice,
stated as such, because the papers report means or medians, not whole distributions.
A workload can also come from a file: YAML/JSON with the same fields as the built-ins,
or JSONL with one recorded request per line (`{"prompt_tokens": 812, "output_tokens": 64}`),
sampled with replacement.

Prompts are sent as token ids drawn at random from common English words: the lengths are
exact, whatever the tokenizer, and no two prompts share a prefix a cache could reuse.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.bench.loadgen import COMMON_WORDS


class LengthDist(BaseModel):
    """A token count distribution: lognormal, given by its mean or its median, clipped."""

    model_config = ConfigDict(extra="forbid")

    mean: float | None = Field(None, gt=0)
    """Mean token count (set this or `median`)."""
    median: float | None = Field(None, gt=0)
    """Median token count (set this or `mean`)."""
    sigma: float = Field(0.8, ge=0, le=3)
    """Standard deviation of log(length): 0 makes every request the same length."""
    min_tokens: int = Field(1, ge=1)
    max_tokens: int = Field(4096, ge=1)

    @model_validator(mode="after")
    def _one_center(self) -> "LengthDist":
        if (self.mean is None) == (self.median is None):
            raise ValueError("give exactly one of mean and median")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = np.log(self.median) if self.median is not None else np.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, n)), self.min_tokens, self.max_tokens).astype(int)


class Workload(BaseModel):
    """A named mix of prompt and output lengths."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    """Where the parameters come from, so a reader can judge how realistic they are."""
    prompt_tokens: LengthDist
    output_tokens: LengthDist


BUILT_IN: dict[str, Workload] = {
    "chat": Workload(
        name="chat",
        source="ShareGPT conversations as measured in the vLLM paper (Kwon et al., SOSP 2023, Fig. 11): "
               "mean prompt 161 tokens, mean output 338 tokens; sigmas 1.0 and 0.8 are ours (ShareGPT lengths are heavy-tailed)",
        prompt_tokens=LengthDist(mean=161, sigma=1.0, min_tokens=4, max_tokens=1024),
        output_tokens=LengthDist(mean=338, sigma=0.8, min_tokens=4, max_tokens=2048)),
    "summarization": Workload(
        name="summarization",
        source="CNN/DailyMail (See et al., ACL 2017): articles of 781 tokens and summaries of 56 tokens "
               "on average; sigma 0.5 is ours",
        prompt_tokens=LengthDist(mean=781, sigma=0.5, min_tokens=64, max_tokens=2048),
        output_tokens=LengthDist(mean=56, sigma=0.5, min_tokens=8, max_tokens=256)),
    "code": Workload(
        name="code",
        source="Azure LLM inference trace 2023, coding service, as reported in Splitwise (Patel et al., "
               "ISCA 2024): median prompt 1500 tokens, median output 13 tokens; sigma 0.7 is ours",
        prompt_tokens=LengthDist(median=1500, sigma=0.7, min_tokens=16, max_tokens=4096),
        output_tokens=LengthDist(median=13, sigma=0.7, min_tokens=2, max_tokens=256)),
    "azure-conversation": Workload(
        name="azure-conversation",
        source="Azure LLM inference trace 2023, conversation service, as reported in Splitwise (Patel et al., "
               "ISCA 2024): median prompt 1020 tokens, median output 129 tokens; sigma 0.7 is ours",
        prompt_tokens=LengthDist(median=1020, sigma=0.7, min_tokens=16, max_tokens=4096),
        output_tokens=LengthDist(median=129, sigma=0.7, min_tokens=2, max_tokens=1024)),
}


@dataclass(frozen=True)
class RecordedWorkload:
    """Lengths of recorded requests, sampled with replacement."""

    name: str
    source: str
    lengths: tuple[tuple[int, int], ...]  # (prompt_tokens, output_tokens)


AnyWorkload = Workload | RecordedWorkload


def load_workload(name_or_path: str) -> AnyWorkload:
    """A built-in workload by name, or one from a YAML/JSON or JSONL file; ValueError saying
    what is wrong otherwise."""
    if name_or_path in BUILT_IN:
        return BUILT_IN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"workload {name_or_path!r} is neither built in ({', '.join(BUILT_IN)}) nor a file")
    if path.suffix == ".jsonl":
        return _recorded(path)
    try:
        return Workload.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as err:
        raise ValueError(f"{path} is not a valid workload: {err}") from None


def _recorded(path: Path) -> RecordedWorkload:
    lengths = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            p, o = int(row["prompt_tokens"]), int(row["output_tokens"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: expected {{\"prompt_tokens\": int, \"output_tokens\": int}}: {err}") from None
        if p < 1 or o < 1:
            raise ValueError(f"{path}:{n}: token counts must be >= 1, got {p} and {o}")
        lengths.append((p, o))
    if not lengths:
        raise ValueError(f"{path} holds no requests")
    return RecordedWorkload(path.stem, f"recorded lengths from {path}", tuple(lengths))


@dataclass(frozen=True)
class SampledRequest:
    prompt_token_ids: list[int]
    output_tokens: int


def sample_lengths(workload: AnyWorkload, n: int, seed: int, max_model_len: int) -> list[tuple[int, int]]:
    """n (prompt_tokens, output_tokens) pairs, each fitted into the context: a prompt longer than
    the context minus its output is cut (prompts are cut, not outputs, so decode load stays)."""
    rng = np.random.default_rng(seed)
    if isinstance(workload, RecordedWorkload):
        picks = rng.integers(len(workload.lengths), size=n)
        pairs = [workload.lengths[i] for i in picks]
    else:
        pairs = list(zip(workload.prompt_tokens.sample(rng, n).tolist(),
                         workload.output_tokens.sample(rng, n).tolist(), strict=True))
    out = []
    for p, o in pairs:
        o = min(o, max_model_len - 1)
        out.append((max(1, min(p, max_model_len - o)), o))
    return out


def word_token_ids(tokenizer) -> list[int]:
    """Token ids of common words that are one token each (with their leading space)."""
    ids = []
    for w in COMMON_WORDS:
        encoded = tokenizer.encode(" " + w, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
    if len(ids) < 8:
        raise ValueError("the tokenizer splits common English words; cannot build prompts of exact lengths")
    return ids


def make_requests(lengths: Sequence[tuple[int, int]], vocabulary: Sequence[int], seed: int | Sequence[int]
                  ) -> list[SampledRequest]:
    """Prompts of exactly the given lengths, random words from `vocabulary` (deterministic for a
    seed; a sequence of ints seeds independent streams, e.g. one per run)."""
    rng = np.random.default_rng(seed)
    vocab = np.asarray(vocabulary)
    return [SampledRequest(vocab[rng.integers(len(vocab), size=p)].tolist(), o) for p, o in lengths]


def describe(workload: AnyWorkload) -> dict:
    """The workload as it goes into the report."""
    if isinstance(workload, RecordedWorkload):
        return {"name": workload.name, "source": workload.source, "recorded_requests": len(workload.lengths)}
    return workload.model_dump()
