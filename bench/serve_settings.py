"""What `pdserve bench serve` is told (its settings, and the objectives they make) and what it
hands its report (the services under test and their runs): shared by the runner (`serve_bench`)
and the report (`serve_report`), which do not import each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdserve.bench import engine_probe
from pdserve.bench.loadgen import RequestResult, RequestSpec

Progress = Callable[[str, int, int], None]
"""(label, done, total) after every finished request."""

Scale = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A multiple of a reference objective."""


class AbsoluteObjective(BaseModel):
    """Objectives as an operator states them for an application, in milliseconds (DistServe sets
    TTFT and TPOT apart: summarization tolerates a slow first token, code completion does not)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")
    """The setting's key in the report (a letter first and no "/", so it never reads as another
    kind's key); None: "<ttft_ms>ms/<tpot_ms>ms"."""
    ttft_ms: float = Field(gt=0, allow_inf_nan=False)
    """TTFT objective."""
    tpot_ms: float = Field(gt=0, allow_inf_nan=False)
    """TPOT objective."""

    @property
    def key(self) -> str:
        """The setting's key in the report."""
        return self.name or f"{self.ttft_ms:g}ms/{self.tpot_ms:g}ms"


def _scale_key(scale: float) -> str:
    return f"{scale:g}"  # "2": the key reports have always used for an SLO scale


def _grid_key(ttft_scale: float, tpot_scale: float) -> str:
    return f"ttft{ttft_scale:g}x/tpot{tpot_scale:g}x"


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
    """Fixed rates to run (a sweep, or one rate); empty: search for goodput at every objective setting."""
    start_rps: float | None = Field(None, gt=0)
    """Where the search starts; None: one request per unloaded end-to-end latency of the reference."""
    slo_scales: list[Scale] = Field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 5.0])
    """Objectives as one multiple of both the reference (unloaded) TTFT and TPOT. Defaults to
    1, 1.5, 2, 3, 5 only when neither a grid nor `objectives_ms` is given; given with them, every
    kind is judged."""
    ttft_scales: list[Scale] = Field(default_factory=list)
    """With `tpot_scales`, a grid: every (TTFT scale, TPOT scale) pair is a setting, each a multiple
    of its own reference objective."""
    tpot_scales: list[Scale] = Field(default_factory=list)
    """The grid's TPOT multiples (see `ttft_scales`)."""
    objectives_ms: list[AbsoluteObjective] = Field(default_factory=list)
    """Absolute objectives, in the order given: the reference does not scale them."""
    send_objectives: bool = False
    """Each request carries the objectives of the setting it is judged at (`ttft_ms`, `tpot_ms`),
    so the router serves what it is judged by; every setting then has runs of its own (and
    `max_runs` of them at most). False: requests carry none (the service's defaults route them)
    and every setting is judged from the same runs."""
    reference_ttft_ms: float | None = Field(None, gt=0)
    """Fix the reference TTFT instead of measuring it."""
    reference_tpot_ms: float | None = Field(None, gt=0)
    """Fix the reference TPOT instead of measuring it."""
    target_attainment: float = Field(0.9, gt=0, le=1)
    """Share of requests that must meet both objectives for a rate to count toward goodput."""
    rel_tol: float = Field(0.2, gt=0)
    """The search stops when goodput is known within this factor."""
    max_runs: int = Field(8, ge=1)
    """Runs per configuration at most (each is `requests_per_rate` requests); per configuration and
    setting with `send_objectives`."""
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

    @model_validator(mode="before")
    @classmethod
    def _default_scales_only_alone(cls, data: Any) -> Any:
        """Asking for a grid or absolute objectives means those: the default scales would add runs'
        worth of settings nobody asked for."""
        if isinstance(data, dict) and "slo_scales" not in data and any(
                data.get(k) for k in ("ttft_scales", "tpot_scales", "objectives_ms")):
            return {**data, "slo_scales": []}
        return data

    @model_validator(mode="after")
    def _settings_are_unambiguous(self) -> ServeBenchSettings:
        """Refuse what could be read more than one way: half a grid, a setting given twice (one key,
        two objectives), nothing to judge."""
        if bool(self.ttft_scales) != bool(self.tpot_scales):
            raise ValueError("ttft_scales and tpot_scales make a grid together: give both "
                             "(e.g. tpot_scales [1] to vary the TTFT objective alone)")
        for name, keys in (("slo_scales", [_scale_key(s) for s in self.slo_scales]),
                           ("ttft_scales", [_scale_key(s) for s in self.ttft_scales]),
                           ("tpot_scales", [_scale_key(s) for s in self.tpot_scales]),
                           ("objectives_ms", [o.key for o in self.objectives_ms])):
            if twice := sorted({k for k in keys if keys.count(k) > 1}):
                raise ValueError(f"{name}: {', '.join(twice)} given twice")
        if not (self.slo_scales or self.ttft_scales or self.objectives_ms):
            raise ValueError("no objectives to judge: give slo_scales, ttft_scales with tpot_scales, or objectives_ms")
        return self


class Objective(BaseModel):
    """One setting of the objectives the runs are judged by: a request counts toward its
    attainment when served within both. Every kind of setting takes this one form, so the
    runner and the report handle them alike."""

    model_config = ConfigDict(frozen=True)

    key: str
    """Names the setting in the report: "2" at SLO scale 2 (as reports always had it),
    "ttft3x/tpot1.5x" in a grid, the name or "15000ms/160ms" for absolute objectives."""
    kind: Literal["slo_scale", "grid", "absolute"]
    """Which setting it comes from: `slo_scales`, the `ttft_scales` x `tpot_scales` grid, `objectives_ms`."""
    ttft_ms: float
    """TTFT objective."""
    tpot_ms: float
    """TPOT objective."""
    ttft_scale: float | None
    """Multiple of the reference TTFT it is; None for absolute objectives."""
    tpot_scale: float | None
    """Multiple of the reference TPOT it is; None for absolute objectives."""


MODES = ("colocated", "disaggregated", "adaptive")
CACHE_ROUTING = {"cache-aware": True, "cache-blind": False}
"""A configuration's routing variant: `routing.prefix_aware` set to this."""


def parse_configuration(name: str) -> tuple[str, bool | None]:
    """`MODE` or `MODE/cache-aware` or `MODE/cache-blind` -> (mode, prefix_aware; None: as the
    config file says); ValueError naming what is allowed."""
    mode, slash, variant = name.partition("/")
    if mode not in MODES or (slash and variant not in CACHE_ROUTING):
        raise ValueError(f"{name!r} is not a configuration: {', '.join(MODES)}, each optionally followed by "
                         f"/{' or /'.join(CACHE_ROUTING)} (e.g. colocated/cache-blind)")
    return mode, CACHE_ROUTING[variant] if slash else None


def judged_objectives(settings: ServeBenchSettings, reference: dict) -> list[Objective]:
    """Every setting to judge, in the report's order: SLO scales tight to loose, the grid by TTFT
    then TPOT scale, absolute objectives as given. `reference` holds the scale-1 ttft_ms and tpot_ms."""
    ttft, tpot = reference["ttft_ms"], reference["tpot_ms"]
    return [
        *(Objective(key=_scale_key(s), kind="slo_scale", ttft_ms=ttft * s, tpot_ms=tpot * s, ttft_scale=s, tpot_scale=s)
          for s in sorted(settings.slo_scales)),
        *(Objective(key=_grid_key(a, b), kind="grid", ttft_ms=ttft * a, tpot_ms=tpot * b, ttft_scale=a, tpot_scale=b)
          for a in sorted(settings.ttft_scales) for b in sorted(settings.tpot_scales)),
        *(Objective(key=o.key, kind="absolute", ttft_ms=o.ttft_ms, tpot_ms=o.tpot_ms, ttft_scale=None, tpot_scale=None)
          for o in settings.objectives_ms),
    ]


@dataclass
class Target:
    """A running service under test."""

    name: str
    http_url: str
    model: str
    engines: list[engine_probe.EngineTarget]  # those a first token comes from; none: the added latency cannot be measured (no Ray handle)
    description: dict = field(default_factory=dict)
    proxy_url: str | None = None  # Serve's proxy, where `http_url` is the ingress's own server: the baseline


@dataclass
class Run:
    rate_rps: float
    duration_s: float
    specs: list[RequestSpec]
    results: list[RequestResult]
    sent: Objective | None = None  # the setting whose objectives the requests carried: judged at it alone
