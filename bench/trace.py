"""Replay traces for `pdserve autoscale --replay`: a workload's request lengths arriving on a
rate schedule (`pdserve bench trace --phases 0.5:300,2:300,0.5:600`).

The schedule is a list of phases, each a rate held for a duration, which is how a policy is
usually questioned: what happens when load steps up, and how long until it steps back down.
Arrivals within a phase are a Poisson process, or gamma-distributed gaps for burstier
traffic at the same mean rate; each phase starts afresh at its own start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pdserve.bench.loadgen import gamma_gaps
from pdserve.bench.workloads import AnyWorkload, sample_lengths
from pdserve.controller.autoscaling.trace import TraceRequest

Arrival = Literal["poisson", "gamma"]


@dataclass(frozen=True)
class Phase:
    rate_rps: float
    """Mean arrivals per second; 0 for an idle phase."""
    duration_s: float


def parse_phases(text: str) -> list[Phase]:
    """`RATE:DURATION_S,...`, e.g. "0.5:300,2:300"; ValueError saying which part is wrong."""
    phases = []
    for part in (p.strip() for p in text.split(",")):
        try:
            rate, duration = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"phase {part!r} is not RATE:DURATION_S (e.g. 2:300)") from None
        if rate < 0 or duration <= 0:
            raise ValueError(f"phase {part!r}: the rate must be >= 0 and the duration > 0")
        phases.append(Phase(rate, duration))
    return phases


def arrival_times(phases: list[Phase], arrival: Arrival = "poisson", burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Arrival offsets over the whole schedule. `burstiness` is the gaps' squared coefficient of
    variation for gamma arrivals (1: as Poisson; larger: bursts); Poisson ignores it."""
    cv2 = burstiness if arrival == "gamma" else 1.0
    rng = np.random.default_rng(seed)
    times: list[float] = []
    start_s = 0.0
    for phase in phases:
        end_s = start_s + phase.duration_s
        t_s = start_s
        while phase.rate_rps > 0:
            # Draw in chunks of about the expected count; a few chunks reach the phase's end.
            gaps = gamma_gaps(rng, phase.rate_rps, cv2, max(16, int(phase.rate_rps * phase.duration_s)))
            chunk = t_s + np.cumsum(gaps)
            times += chunk[chunk < end_s].tolist()
            if chunk[-1] >= end_s:
                break
            t_s = float(chunk[-1])
        start_s = end_s
    return times


def make_trace(workload: AnyWorkload, phases: list[Phase], arrival: Arrival = "poisson", burstiness: float = 1.0,
               seed: int = 0, max_model_len: int = 8192) -> list[TraceRequest]:
    """Requests arriving on the schedule with the workload's lengths; the same for a seed."""
    times = arrival_times(phases, arrival, burstiness, seed)
    lengths = sample_lengths(workload, len(times), seed, max_model_len)
    return [TraceRequest(round(t, 6), p, o) for t, (p, o) in zip(times, lengths, strict=True)]
