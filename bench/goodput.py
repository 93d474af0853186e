"""Goodput: the highest request rate at which at least `target` of the requests meet both
their TTFT and their TPOT objective (DistServe's definition), found by a search over rates.

Pure: the search calls `attainment_at(rate)` and never measures anything itself, so the
caller decides what a probe costs (a run against a live service, cached per rate, or a
synthetic trace in a test). It assumes attainment falls as the rate grows, which holds
for a queueing service up to noise; with noise the answer is a rate that passed, never
one interpolated between probes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.bench.loadgen import RequestResult, met_objectives

log = logging.getLogger("pdserve.bench.goodput")


def attainment(results: Sequence[RequestResult], ttft_ms: float, tpot_ms: float) -> float:
    """Fraction of all requests (rejected and failed ones included) that were served with
    TTFT <= ttft_ms and TPOT <= tpot_ms. A one-token answer has no TPOT and meets it."""
    if not results:
        raise ValueError("attainment of no requests")
    return sum(met_objectives(r, (ttft_ms, tpot_ms)) for r in results) / len(results)


@dataclass(frozen=True)
class Probe:
    rate_rps: float
    attainment: float


@dataclass(frozen=True)
class GoodputResult:
    goodput_rps: float
    """Highest probed rate whose attainment reached the target; 0 when none did."""
    upper_rps: float | None
    """Lowest probed rate above it that missed the target (the answer lies in between);
    None when every rate up to the search's ceiling passed, or nothing was probed above."""
    probes: tuple[Probe, ...]
    """Every rate looked at, in the order the search looked."""

    def as_dict(self) -> dict:
        return {"goodput_rps": self.goodput_rps, "upper_rps": self.upper_rps,
                "probes": [{"rate_rps": p.rate_rps, "attainment": p.attainment} for p in self.probes]}


def search_goodput(attainment_at: Callable[[float], float | None], start_rps: float, *, target: float = 0.9,
                   rel_tol: float = 0.15, min_rps: float | None = None, max_rps: float | None = None,
                   max_probes: int = 10) -> GoodputResult:
    """Find goodput within a factor `1 + rel_tol`.

    From `start_rps`, double the rate while it passes (halve while it fails) until the
    target is bracketed, then bisect the bracket geometrically (rates span orders of
    magnitude, so halving the ratio converges evenly at any scale). Stops at `max_probes`,
    at `min_rps` (below it goodput is reported as 0), at `max_rps`, and when `attainment_at`
    returns None (the caller cannot measure that rate: its budget is spent).
    """
    if start_rps <= 0:
        raise ValueError(f"start_rps must be > 0, got {start_rps}")
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if rel_tol <= 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol}")
    min_rps = min_rps if min_rps is not None else start_rps / 16
    max_rps = max_rps if max_rps is not None else start_rps * 16
    probes: list[Probe] = []

    def passes(rate: float) -> bool | None:
        a = attainment_at(rate)
        if a is None:
            return None
        probes.append(Probe(rate, a))
        return a >= target

    good: float | None = None
    bad: float | None = None
    rate = min(max(start_rps, min_rps), max_rps)
    while len(probes) < max_probes:  # bracket
        ok = passes(rate)
        if ok is None:
            break
        if ok:
            good = rate
            if bad is not None or rate >= max_rps:
                break
            rate = min(rate * 2, max_rps)
        else:
            bad = rate
            if good is not None or rate <= min_rps:
                break
            rate = max(rate / 2, min_rps)
    while good is not None and bad is not None and bad / good > 1 + rel_tol and len(probes) < max_probes:
        mid = math.sqrt(good * bad)
        ok = passes(mid)
        if ok is None:
            break
        if ok:
            good = mid
        else:
            bad = mid
    result = GoodputResult(good or 0.0, bad, tuple(probes))
    log.info("goodput %.3f rps (next failing rate %s) after %d probes: %s", result.goodput_rps,
             f"{bad:.3f}" if bad is not None else "none",
             len(probes), ", ".join(f"{p.rate_rps:.3f}->{p.attainment:.2f}" for p in probes))
    return result
