"""`pdserve bench overload`'s figures from what its phases measured (`overload` runs them): the
latency held as normal, recovery, memory growth, the goals, and the JSON report.

Recovery rule: a probe is normal when it was served and its TTFT and TPOT (if it has one) are each at
most `recovered_factor` x the baseline's median for chat requests (the unloaded chat figures when the
baseline served none). `recovered_after_s` is the send time, after the end of the overload, of the
first probe from which on every probe is normal; None when the last probe is not.

Memory: RSS samples of the benchmark's process tree. Shared pages count once per process, so the
level overstates the total; its change over time is what shows growth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pdserve.bench.loadgen import RequestResult, RequestSpec
from pdserve.bench.overload_settings import OverloadSettings
from pdserve.bench.slo_compare import phase_summary

MEMORY_WINDOW_S = 10.0
"""Memory levels off when the peak of the overload's last window is no higher than its first's."""
_MIB = 2**20


@dataclass(frozen=True)
class Probe:
    sent_after_s: float
    """Since the end of the overload."""
    outcome: str
    ttft_ms: float | None
    tpot_ms: float | None


@dataclass(frozen=True)
class MemorySample:
    t_s: float
    """Since the start of the overload (negative before it)."""
    phase: str
    rss_bytes: int


@dataclass(frozen=True)
class Phase:
    start_s: float
    """Since the start of the overload."""
    specs: list[RequestSpec]
    results: list[RequestResult]
    duration_s: float


def normal_latency(baseline: list[RequestResult], unloaded_chat: dict) -> dict:
    """The latency probes are held to: the baseline's chat median, else the unloaded chat one."""
    chat = [r for r in baseline if r.kind == "chat" and r.outcome == "ok" and r.ttft_ms is not None]
    tpots = [r.tpot_ms for r in chat if r.tpot_ms is not None]
    if not chat:
        return {"source": "unloaded", "ttft_ms": unloaded_chat["ttft_ms"], "tpot_ms": unloaded_chat["tpot_ms"]}
    return {"source": "baseline", "ttft_ms": float(np.median([r.ttft_ms for r in chat])),
            "tpot_ms": float(np.median(tpots)) if tpots else unloaded_chat["tpot_ms"]}


def recovered_after_s(probes: list[Probe], normal: dict, factor: float) -> float | None:
    """The module docstring's recovery rule."""
    def is_normal(p: Probe) -> bool:
        return (p.outcome == "ok" and p.ttft_ms is not None and p.ttft_ms <= factor * normal["ttft_ms"]
                and (p.tpot_ms is None or p.tpot_ms <= factor * normal["tpot_ms"]))

    first = len(probes)
    while first > 0 and is_normal(probes[first - 1]):
        first -= 1
    return probes[first].sent_after_s if first < len(probes) else None


def memory_summary(samples: list[MemorySample], duration_s: float) -> dict:
    """Peak RSS per phase, the overload's peak over the baseline's, and the peak of the overload's
    last `MEMORY_WINDOW_S` over that of its first (near 0 when memory levels off)."""
    peaks: dict[str, int] = {}
    for s in samples:
        peaks[s.phase] = max(peaks.get(s.phase, 0), s.rss_bytes)
    over = [s for s in samples if s.phase == "overload"]
    first = max((s.rss_bytes for s in over if s.t_s < MEMORY_WINDOW_S), default=None)
    last = max((s.rss_bytes for s in over if s.t_s >= duration_s - MEMORY_WINDOW_S), default=None)
    base, both = peaks.get("baseline"), first is not None and last is not None
    return {"samples": len(samples), "peak_mib": {p: round(b / _MIB, 1) for p, b in peaks.items()},
            "overload_over_baseline_mib": round((peaks["overload"] - base) / _MIB, 1) if over and base else None,
            "last_over_first_mib": round((last - first) / _MIB, 1) if both else None,
            "last_over_first_fraction": round((last - first) / base, 4) if both and base else None}


def overload_figures(phase: Phase) -> dict:
    """`phase_summary`, plus attainment of the admitted (those not refused, so a failed one counts as
    a miss) and the share of refusals that carried Retry-After."""
    summary = phase_summary(phase.specs, phase.results, phase.duration_s)
    rejected = [r for r in phase.results if r.outcome == "rejected"]
    admitted = len(phase.results) - len(rejected)
    return {**summary, "admitted": admitted, "attainment_of_admitted": summary["met"] / admitted if admitted else None,
            "retry_after_fraction": (sum(r.retry_after_s is not None for r in rejected) / len(rejected)
                                     if rejected else None)}


def goals(over: dict, errors: int, recovered_s: float | None, memory: dict | None, s: OverloadSettings) -> dict:
    """Target, value and met per claim; met is None where nothing was measured (no refusals, or
    memory not sampled). `worst_kind_attainment`: the least share of its requests any kind (chat,
    long) had served within its objectives; 0 means that kind was starved."""
    att, p99, retry = over["attainment_of_admitted"], (over["reject_ms"] or {}).get("p99"), over["retry_after_fraction"]
    growth = (memory or {}).get("last_over_first_fraction")
    kinds = over.get("by_kind") or {}
    worst = min((k["met"] / k["requests"] for k in kinds.values() if k["requests"]), default=None)
    return {"errors": {"target": 0, "value": errors, "met": errors == 0},
            "attainment_of_admitted": {"target": 0.9, "value": att, "met": att is not None and att >= 0.9},
            "reject_p99_ms": {"target": s.reject_p99_target_ms, "value": p99,
                              "met": None if p99 is None else p99 < s.reject_p99_target_ms},
            "retry_after_fraction": {"target": 1.0, "value": retry, "met": None if retry is None else retry == 1.0},
            "recovered_after_s": {"target": s.recovery_target_s, "value": recovered_s,
                                  "met": recovered_s is not None and recovered_s <= s.recovery_target_s},
            "worst_kind_attainment": {"target": "> 0", "value": worst, "met": None if worst is None else worst > 0},
            "memory_growth_fraction": {"target": s.memory_growth_target, "value": growth,
                                       "met": None if growth is None else growth <= s.memory_growth_target}}


def assemble(s: OverloadSettings, service: dict, calibration: dict, objectives: dict, baseline: Phase,
             overload: Phase, probes: list[Probe], samples: list[MemorySample] | None) -> dict:
    """The JSON report; `samples` is None when memory was not sampled (a service run elsewhere)."""
    normal = normal_latency(baseline.results, calibration["unloaded"]["chat"])
    recovered = recovered_after_s(probes, normal, s.recovered_factor)
    over = overload_figures(overload)
    memory = memory_summary(samples, s.duration_s) if samples is not None else None
    errors = sum(r.outcome == "error" for r in (*baseline.results, *overload.results, *probes))
    rows = [{"phase": name, "t_s": round(p.start_s + q.arrival_s, 3), "kind": r.kind, "outcome": r.outcome,
             "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "e2e_ms": r.e2e_ms}
            for name, p in (("baseline", baseline), ("overload", overload))
            for q, r in zip(p.specs, p.results, strict=True)]
    return {"tool": "pdserve bench overload", "settings": asdict(s), "service": service, "calibration": calibration,
            "objectives_ms": {k: {"ttft_ms": round(t, 1), "tpot_ms": round(p, 1)} for k, (t, p) in objectives.items()},
            "baseline": phase_summary(baseline.specs, baseline.results, baseline.duration_s), "overload": over,
            "recovery": {"normal": normal, "recovered_after_s": recovered, "probes": [asdict(p) for p in probes]},
            "memory": memory or {"sampled": False, "why": "--url: the service's processes are not this one's"},
            "goals": goals(over, errors, recovered, memory, s),
            "timeline": {"requests": rows, "memory": [{"t_s": round(m.t_s, 2), "phase": m.phase,
                                                       "rss_mib": round(m.rss_bytes / _MIB, 1)} for m in samples or ()]}}


def summary_lines(report: dict) -> list[str]:
    """The key figures for stdout: each phase's counts and latency, then each goal."""
    def fmt(value: float | None, spec: str = ".3g") -> str:
        return "-" if value is None else format(value, spec)

    cal = report["calibration"]
    lines = [f"offered: baseline {cal['baseline_rps']:.2f} req/s, overload {cal['overload_rps']:.2f} req/s "
             f"(capacity estimate {cal['capacity_rps']:.2f} req/s: one prefill engine alone); overload goodput "
             f"{report['overload']['goodput_rps']:.2f} req/s"
             + (f"; calibration from {cal['from']}" if cal.get("from") else "")]
    for name in ("baseline", "overload"):
        p = report[name]
        lines.append(f"{name:8}: {p['requests']} requests, {p['ok']} served, {p['rejected']} refused, {p['error']} "
                     f"failed, {p['met']} met; TTFT p50 {fmt((p['ttft_ms'] or {}).get('p50'), '.0f')} ms, "
                     f"TPOT p50 {fmt((p['tpot_ms'] or {}).get('p50'), '.0f')} ms")
        lines += [f"  {kind:6}: {k['requests']} requests, {k['ok']} served, {k['rejected']} refused, {k['met']} met"
                  for kind, k in sorted((p.get("by_kind") or {}).items())]
    normal, peaks = report["recovery"]["normal"], report["memory"].get("peak_mib", "not sampled")
    lines += [f"recovery: {len(report['recovery']['probes'])} probes against {normal['source']} chat TTFT "
              f"{normal['ttft_ms']:.0f} ms / TPOT {normal['tpot_ms']:.0f} ms; peak RSS (MiB) by phase: {peaks}"]
    for name, g in report["goals"].items():
        verdict = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        lines.append(f"{name:24} target {g['target']!s:>6}  value {fmt(g['value']):>8}  {verdict}")
    return lines


def write(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """overload.json and overload.png in `out_dir`."""
    from pdserve.bench.plots import overload_timeline

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "overload.json"
    path.write_text(json.dumps(report, indent=1))
    return path, overload_timeline(report, out_dir / "overload.png")
