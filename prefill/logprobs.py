"""vLLM's per-token log-probabilities, as the engine replicas hand them to the ingress."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pdserve.prefill.requests import TokenLogprob

FLOOR = -9999.0
"""A token the sampling rules out has logprob -inf, which JSON cannot carry: vLLM's server
reports this instead, and so does pdserve."""


def token_logprobs(token_ids: Sequence[int], positions: Sequence[Mapping[int, Any]] | None,
                   top: int | None) -> list[TokenLogprob] | None:
    """One TokenLogprob per sampled token: vLLM's `CompletionOutput.logprobs` (per position,
    token id -> Logprob holding the sampled token and the likeliest ones, ranked) cut to the
    `top` likeliest; None when the request asked for no logprobs."""
    if top is None or positions is None:
        return None
    out = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        ranked = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top),
                        key=lambda lp: lp.rank)
        out.append(TokenLogprob(chosen.decoded_token or "", _finite(chosen.logprob),
                                [(lp.decoded_token or "", _finite(lp.logprob)) for lp in ranked]))
    return out


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR
