"""What `pdserve bench serve` is told (its settings) and what it hands its report (the services
under test and their runs): shared by the runner (`serve_bench`) and the report (`serve_report`),
which do not import each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.bench import engine_probe
from pdserve.bench.loadgen import RequestResult, RequestSpec

Progress = Callable[[str, int, int], None]
"""(label, done, total) after every finished request."""


class ServeBenchSettings(BaseModel):
    """What `pdserve bench serve` sends and how it searches."""

    model_config = ConfigDict(extra="forbid")

    requests_per_rate: int = Field(40, ge=1)
    """Requests in each run; attainment is counted over them."""
    arrival: Literal["poisson", "gamma"] = "poisson"
    """Arrival process of each run (open loop)."""
    burstiness: float = Field(1.0, gt=0)
    """Gamma arrivals: squared coefficient of variation of the gaps (1 = Poisson, larger = burstier)."""
    rates_rps: list[float] = Field(default_factory=list)
    """Fixed rates to run (a sweep, or one rate); empty: search for goodput at every SLO scale."""
    start_rps: float | None = Field(None, gt=0)
    """Where the search starts; None: one request per unloaded end-to-end latency of the reference."""
    slo_scales: list[float] = Field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 5.0])
    """Objectives as multiples of the reference (unloaded) TTFT and TPOT, tight to loose."""
    reference_ttft_ms: float | None = Field(None, gt=0)
    """Fix the reference TTFT instead of measuring it."""
    reference_tpot_ms: float | None = Field(None, gt=0)
    """Fix the reference TPOT instead of measuring it."""
    target_attainment: float = Field(0.9, gt=0, le=1)
    """Share of requests that must meet both objectives for a rate to count toward goodput."""
    rel_tol: float = Field(0.2, gt=0)
    """The search stops when goodput is known within this factor."""
    max_runs: int = Field(8, ge=1)
    """Runs per configuration at most (each is `requests_per_rate` requests)."""
    calibration_requests: int = Field(10, ge=1)
    """Unloaded requests before the runs (and as many pairs measuring the latency pdserve adds)."""
    probe_prompt_tokens: int = Field(16, ge=1)
    """Prompt length of the pairs that measure the latency pdserve adds."""
    calibration_max_tokens: int = Field(32, ge=2)
    """Output tokens of each calibration request (TTFT and TPOT need no more)."""
    max_model_len: int = Field(2048, ge=16)
    """Context the workload's lengths are fitted into (the service's max_model_len)."""
    seed: int = Field(0, ge=0)
    """Seeds lengths, prompt contents and arrivals: the same seed sends the same requests."""
    timeout_s: float = Field(600.0, gt=0)
    """Per request, client side."""


@dataclass
class Target:
    """A running service under test."""

    name: str
    http_url: str
    model: str
    engine: engine_probe.EngineTarget | None  # None: the added latency cannot be measured (no Ray handle)
    description: dict = field(default_factory=dict)


@dataclass
class Run:
    rate_rps: float
    duration_s: float
    specs: list[RequestSpec]
    results: list[RequestResult]
