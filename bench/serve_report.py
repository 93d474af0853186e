"""The JSON report of `pdserve bench serve`: every figure, and what produced it.

Its fields are documented in the README's benchmark section; a test checks that a real run's
report has every field documented there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.goodput import attainment
from pdserve.bench.hardware import hardware
from pdserve.bench.loadgen import RequestResult, RequestSpec, percentiles
from pdserve.bench.serve_settings import Run, ServeBenchSettings, Target
from pdserve.bench.workloads import describe

_QS = (50, 90, 99)


def objectives_at(reference: dict, scale: float) -> tuple[float, float]:
    """(ttft_ms, tpot_ms) at an SLO scale: the reference objectives times the scale."""
    return reference["ttft_ms"] * scale, reference["tpot_ms"] * scale


def _kv_stats(results: list[RequestResult]) -> dict | None:
    kv = [r.kv_transfer for r in results if r.outcome == "ok" and r.kv_transfer]
    if not kv:
        return None
    return {"transfers": len(kv), "failed": sum(k.get("state") != "DONE" for k in kv),
            "bytes": percentiles([float(k["bytes"]) for k in kv], _QS),
            "bytes_mean": float(np.mean([k["bytes"] for k in kv])),
            "transfer_ms": percentiles([float(k["transfer_ms"]) for k in kv], _QS),
            "exposed_ms": percentiles([float(k["exposed_ms"]) for k in kv], _QS)}


def _request_row(spec: RequestSpec, r: RequestResult) -> dict:
    kv = r.kv_transfer or {}
    return {"arrival_s": spec.arrival_s, "outcome": r.outcome, "status": r.status, "prompt_tokens": len(spec.prompt),
            "requested_output_tokens": spec.max_tokens, "output_tokens": r.completion_tokens, "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "e2e_ms": r.e2e_ms,
            "kv_bytes": kv.get("bytes"), "kv_transfer_ms": kv.get("transfer_ms"), "kv_exposed_ms": kv.get("exposed_ms"),
            "error": r.error or None}


def run_section(run: Run, reference: dict, scales: list[float]) -> dict:
    ok = [r for r in run.results if r.outcome == "ok"]
    counts = {o: sum(r.outcome == o for r in run.results) for o in ("ok", "rejected", "error")}
    return {
        "rate_rps": run.rate_rps, "duration_s": run.duration_s, "requests": len(run.results), **counts,
        "throughput_rps": len(ok) / run.duration_s,
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / run.duration_s,
        "ttft_ms": percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None], _QS),
        "tpot_ms": percentiles([r.tpot_ms for r in ok if r.tpot_ms is not None], _QS),
        "e2e_ms": percentiles([r.e2e_ms for r in ok], _QS),
        "attainment": {f"{s:g}": attainment(run.results, *objectives_at(reference, s))
                       for s in scales},
        "kv_transfer": _kv_stats(run.results),
        "errors": sorted({r.error[:200] for r in run.results if r.outcome == "error"})[:5],
        "per_request": [_request_row(s, r) for s, r in zip(run.specs, run.results, strict=True)],
    }


def _sweep_goodput(runs: list[dict], scale: str, target: float) -> dict:
    """Goodput over fixed rates: the highest rate that passed (no search)."""
    passed = [r["rate_rps"] for r in runs if r["attainment"][scale] >= target]
    failed = [r["rate_rps"] for r in runs if r["attainment"][scale] < target]
    good = max(passed, default=0.0)
    above = [f for f in failed if f > good]
    return {"goodput_rps": good, "upper_rps": min(above) if above else None,
            "probes": [{"rate_rps": r["rate_rps"], "attainment": r["attainment"][scale]} for r in runs]}


def target_section(target: Target, calibration: dict, runs: Mapping[float, Run], reference: dict,
                   settings: ServeBenchSettings, searched: dict[str, dict]) -> dict:
    scales = sorted(settings.slo_scales)
    run_rows = [run_section(runs[rate], reference, scales) for rate in sorted(runs)]
    goodput = {f"{s:g}": searched.get(f"{s:g}") or _sweep_goodput(run_rows, f"{s:g}", settings.target_attainment)
               for s in scales}
    return {"service": target.description, "http_url": target.http_url, "calibration": calibration,
            "runs": run_rows, "goodput": goodput}


def comparison(configs: dict[str, dict], reference: dict, scales: list[float], baseline: str | None) -> list[dict]:
    """Goodput of every configuration at every scale, and each one's ratio to the baseline's."""
    rows = []
    for s in sorted(scales):
        key = f"{s:g}"
        goodput = {name: c["goodput"][key]["goodput_rps"] for name, c in configs.items()}
        base = goodput.get(baseline) if baseline else None
        ttft_ms, tpot_ms = objectives_at(reference, s)
        rows.append({"slo_scale": s, "ttft_ms": ttft_ms, "tpot_ms": tpot_ms,
                     "goodput_rps": goodput,
                     "ratio_to_baseline": {n: (g / base if base else None) for n, g in goodput.items()}})
    return rows


def headline(rows: list[dict], baseline: str, other: str, goal_ratio: float) -> dict:
    """The issue's goal: `other`'s goodput over `baseline`'s at the tightest scale where the
    baseline still serves anything (a goodput above 0)."""
    served = [r for r in rows if r["goodput_rps"].get(baseline)]
    if not served:
        return {"slo_scale": None, "ratio": None, "goal_ratio": goal_ratio, "met": False,
                "note": f"{baseline} met no scale's objectives at any rate tried"}
    tightest = served[0]
    ratio = tightest["ratio_to_baseline"][other]
    return {"slo_scale": tightest["slo_scale"], "ttft_ms": tightest["ttft_ms"], "tpot_ms": tightest["tpot_ms"],
            "goodput_rps": tightest["goodput_rps"], "ratio": ratio, "goal_ratio": goal_ratio,
            "met": ratio is not None and ratio >= goal_ratio}


def summary(report: dict) -> list[str]:
    """The report's headline figures, for a terminal."""
    ref = report["slo"]["reference"]
    lines = [f"reference objectives (scale 1, {ref['from']} unloaded p90): TTFT {ref['ttft_ms']:.0f} ms, "
             f"TPOT {ref['tpot_ms']:.1f} ms"]
    for name, c in report["configs"].items():
        added = c["calibration"].get("added_latency")
        if added:
            lines.append(f"{name}: pdserve adds {added['added_ms']['p50']:.1f} ms median TTFT in front of one engine")
        run = next((r for r in c["runs"] if r["kv_transfer"]), None)
        if run is not None:
            kv = run["kv_transfer"]
            lines.append(f"{name}: at {run['rate_rps']:.3g} req/s, {kv['transfers']} KV transfers of "
                         f"{kv['bytes_mean'] / 2**20:.1f} MiB on average, {kv['transfer_ms']['p50']:.0f} ms median "
                         f"from prefill start, {kv['exposed_ms']['p50']:.1f} ms exposed")
    for row in report["comparison"]:
        goodput = "  ".join(f"{n} {g:.3f}" for n, g in row["goodput_rps"].items())
        lines.append(f"scale {row['slo_scale']:g} (TTFT {row['ttft_ms']:.0f} ms, TPOT {row['tpot_ms']:.1f} ms): "
                     f"goodput req/s  {goodput}")
    if "goal" in report:
        g = report["goal"]
        lines.append(f"goal: disaggregated/colocated at the tightest scale colocated serves ({g['slo_scale']}): "
                     f"{g['ratio']} (target >= {g['goal_ratio']}) -> {'met' if g['met'] else 'not met'}")
    return lines


def write(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "serve.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    tmp.replace(path)
    return path


def assemble(settings: ServeBenchSettings, workload: Any, configs: dict[str, dict], reference: dict,
             start_rps: float, model_path: str, baseline: str | None) -> dict:
    """The whole report; `goal` compares disaggregated with colocated when both ran."""
    scales = sorted(settings.slo_scales)
    rows = comparison(configs, reference, scales, baseline)
    report = {
        "tool": "pdserve bench serve", "created_unix_s": time.time(), "command": sys.argv,
        "hardware": hardware(), "model": {"path": model_path},
        "workload": {**describe(workload), "arrival": settings.arrival,
                     "burstiness": settings.burstiness if settings.arrival == "gamma" else 1.0,
                     "requests_per_rate": settings.requests_per_rate, "seed": settings.seed},
        "settings": settings.model_dump(mode="json"),
        "slo": {"reference": reference, "scales": scales, "target_attainment": settings.target_attainment},
        "search_start_rps": start_rps,
        "configs": configs, "comparison": rows,
    }
    if baseline == "colocated" and "disaggregated" in configs:
        report["goal"] = headline(rows, "colocated", "disaggregated", 2.0)
    return report
