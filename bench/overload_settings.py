"""What `pdserve bench overload` is told: load, phases and goals. Shared by the runner
(`overload`) and the report (`overload_report`), which do not import each other."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.bench.slo_compare import Workload


@dataclass(frozen=True)
class OverloadSettings:
    overload: float = 3.0
    """Overload arrival rate as a multiple of the estimated capacity."""
    duration_s: float = 60.0
    recovery_s: float = 20.0
    slo_scale: float = 3.0
    baseline_load: float = 0.5
    baseline_s: float = 20.0
    burstiness: float = 1.0
    """Squared coefficient of variation of the arrival gaps (1: Poisson): steady overload, not bursts."""
    probe_max_tokens: int = 8
    """Short probes make recovery's resolution about one probe (about a second unloaded)."""
    probe_gap_s: float = 0.5
    """Probes start at least this far apart: refused ones come back at once and would otherwise add load."""
    recovered_factor: float = 1.5
    recovery_target_s: float = 10.0
    """"Within seconds": what the overload admitted is bounded by its objectives (a few seconds for a
    long prompt here), so normal latency should be back well within this."""
    reject_p99_target_ms: float = 50.0
    """"Immediate": `bench slo`'s target, below a chat's unloaded TTFT (66 ms on 2 cores, default model)."""
    memory_growth_target: float = 0.05
    """Allowed rise of peak RSS from the overload's first to its last `MEMORY_WINDOW_S`, as a fraction
    of the baseline's peak: an unbounded queue keeps rising, a bounded one levels off."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("overload", "duration_s", "recovery_s", "slo_scale", "baseline_load", "baseline_s", "burstiness",
                     "probe_gap_s", "recovered_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.probe_max_tokens < 2:
            raise ValueError(f"probe_max_tokens must be >= 2 (a TPOT needs two tokens), got {self.probe_max_tokens}")

    def workload(self) -> Workload:
        return Workload(overload=self.overload, overload_s=self.duration_s, burstiness=self.burstiness,
                        slo_scale=self.slo_scale, seed=self.seed)
