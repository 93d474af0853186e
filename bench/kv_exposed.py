"""Exposed KV transfer time on real engines: from the end of the prefill forward
to the KV being usable in the decode engine's cache, next to the prefill time.

A prefill engine (core 0) pushes layer by layer while it computes, so only the
tail of the transfer should show. The decode engine (core 1) reports both times
in the request's `kv_transfer_params`.
"""

from __future__ import annotations

import functools
import statistics
import uuid
from dataclasses import dataclass

from pdserve.bench.engine_process import DisaggregatedPair
from pdserve.kvtransfer import params

_TEXT = (
    "Distributed systems trade consistency, availability and latency against one another; "
    "every design decision moves the balance a little. "
)


@dataclass
class ExposedResult:
    prompt_tokens: int
    runs: int
    prefill_compute_ms: float  # medians over runs
    exposed_transfer_ms: float
    load_ms: float
    kv_mib: float

    @property
    def exposed_fraction(self) -> float:
        return self.exposed_transfer_ms / self.prefill_compute_ms


@functools.cache
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def prompt_ids(model: str, run: int, n_tokens: int) -> list[int]:
    """`n_tokens` of text whose first sentence differs every call, which keeps every engine's prefix
    cache out of the measurement."""
    repeats = n_tokens // 16 + 1  # _TEXT is over 16 tokens
    ids = _tokenizer(model)(f"Run {run}: {uuid.uuid4().hex}. " + _TEXT * repeats)["input_ids"]
    return ids[:n_tokens]


def run(model: str, secret: str, prompt_tokens: int = 1000, runs: int = 3, progress=None) -> ExposedResult:
    reports = []
    with DisaggregatedPair(model, secret, log_level="WARNING") as pair:
        for i in range(runs + 1):  # the first run warms both engines up and is not counted
            rep = pair.generate(prompt_ids(model, i, prompt_tokens), max_tokens=1)["kv_transfer_params"][params.KEY]
            if rep["state"] != "DONE":
                raise RuntimeError(f"transfer failed: {rep['error']}")
            if i:
                reports.append(rep)
            if progress:
                progress(1)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in reports)

    return ExposedResult(
        prompt_tokens, runs, median("prefill_compute_ms"), median("exposed_ms"), median("load_ms"), median("bytes") / 2**20
    )
