"""The JSON report of `pdserve bench serve`: every figure, and what produced it.

Its fields are documented in the README's benchmark section; a test checks that a real run's
report has every field documented there.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.conversations import ConversationWorkload
from pdserve.bench.goodput import attainment
from pdserve.bench.hardware import hardware
from pdserve.bench.loadgen import RequestResult, RequestSpec, percentiles
from pdserve.bench.serve_settings import Objective, Run, ServeBenchSettings, Target, judged_objectives
from pdserve.bench.workloads import describe

_QS = (50, 90, 99)


def _kv_stats(results: list[RequestResult]) -> dict | None:
    kv = [r.kv_transfer for r in results if r.outcome == "ok" and r.kv_transfer]
    if not kv:
        return None
    return {"transfers": len(kv), "failed": sum(k.get("state") != "DONE" for k in kv),
            "bytes": percentiles([float(k["bytes"]) for k in kv], _QS),
            "bytes_mean": float(np.mean([k["bytes"] for k in kv])),
            "transfer_ms": percentiles([float(k["transfer_ms"]) for k in kv], _QS),
            "exposed_ms": percentiles([float(k["exposed_ms"]) for k in kv], _QS)}


def _cached_fraction(results: list[RequestResult]) -> float | None:
    """Share of the prompt tokens of served requests that their engines found in a prefix cache;
    None when the service reported no cached counts."""
    served = [r for r in results if r.outcome == "ok" and r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in served)
    return sum(r.cached_tokens or 0 for r in served) / prompt if prompt else None


def _by_kind(results: list[RequestResult]) -> dict:
    """Per request kind ("load"; a conversation's "first_turn" and "later_turn"): how many, their
    TTFT, and how much of their prompts came from cache."""
    out = {}
    for kind in sorted({r.kind for r in results}):
        of = [r for r in results if r.kind == kind]
        out[kind] = {"requests": len(of),
                     "ttft_ms": percentiles([r.ttft_ms for r in of if r.outcome == "ok" and r.ttft_ms is not None], _QS),
                     "cached_prompt_fraction": _cached_fraction(of)}
    return out


def _request_row(spec: RequestSpec, r: RequestResult) -> dict:
    kv = r.kv_transfer or {}
    return {"arrival_s": spec.arrival_s, "kind": spec.kind, "session_id": spec.session_id,
            "cached_tokens": r.cached_tokens, "outcome": r.outcome, "status": r.status, "prompt_tokens": len(spec.prompt),
            "requested_output_tokens": spec.max_tokens, "output_tokens": r.completion_tokens, "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "e2e_ms": r.e2e_ms,
            "kv_bytes": kv.get("bytes"), "kv_transfer_ms": kv.get("transfer_ms"), "kv_exposed_ms": kv.get("exposed_ms"),
            "error": r.error or None}


def run_section(run: Run, judged: list[Objective]) -> dict:
    """One run's figures, judged at every setting, or at the one whose objectives its requests carried."""
    ok = [r for r in run.results if r.outcome == "ok"]
    judged = [run.sent] if run.sent else judged
    counts = {o: sum(r.outcome == o for r in run.results) for o in ("ok", "rejected", "error")}
    return {
        "rate_rps": run.rate_rps, "duration_s": run.duration_s, "requests": len(run.results), **counts,
        "throughput_rps": len(ok) / run.duration_s,
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / run.duration_s,
        "ttft_ms": percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None], _QS),
        "tpot_ms": percentiles([r.tpot_ms for r in ok if r.tpot_ms is not None], _QS),
        "e2e_ms": percentiles([r.e2e_ms for r in ok], _QS),
        "objectives_sent": run.sent.key if run.sent else None,
        "attainment": {o.key: attainment(run.results, o.ttft_ms, o.tpot_ms) for o in judged},
        "kv_transfer": _kv_stats(run.results),
        "cached_prompt_fraction": _cached_fraction(run.results),
        "by_kind": _by_kind(run.results),
        "errors": sorted({r.error[:200] for r in run.results if r.outcome == "error"})[:5],
        "per_request": [_request_row(s, r) for s, r in zip(run.specs, run.results, strict=True)],
    }


def _sweep_goodput(runs: list[dict], key: str, target: float) -> dict:
    """Goodput over fixed rates: the highest rate that passed (no search), of the runs judged at `key`."""
    runs = [r for r in runs if key in r["attainment"]]
    passed = [r["rate_rps"] for r in runs if r["attainment"][key] >= target]
    failed = [r["rate_rps"] for r in runs if r["attainment"][key] < target]
    good = max(passed, default=0.0)
    above = [f for f in failed if f > good]
    return {"goodput_rps": good, "upper_rps": min(above) if above else None,
            "probes": [{"rate_rps": r["rate_rps"], "attainment": r["attainment"][key]} for r in runs]}


def target_section(target: Target, calibration: dict, runs: list[Run], judged: list[Objective],
                   settings: ServeBenchSettings, searched: dict[str, dict]) -> dict:
    """One configuration: its runs by rate (then setting), each judged at every setting or at the
    one it sent, and its goodput per setting (as searched, else the highest fixed rate that passed)."""
    order = {o.key: i for i, o in enumerate(judged)}
    runs = sorted(runs, key=lambda r: (r.rate_rps, order[r.sent.key] if r.sent else -1))
    run_rows = [run_section(run, judged) for run in runs]
    goodput = {o.key: searched.get(o.key) or _sweep_goodput(run_rows, o.key, settings.target_attainment)
               for o in judged}
    return {"service": target.description, "http_url": target.http_url, "calibration": calibration,
            "runs": run_rows, "goodput": goodput}


def comparison(configs: dict[str, dict], judged: list[Objective], baseline: str | None) -> list[dict]:
    """Goodput of every configuration at every setting, and each one's ratio to the baseline's.
    `slo_scale` is the SLO scale of a scale's row (as reports always had it), null in the others."""
    rows = []
    for o in judged:
        goodput = {name: c["goodput"][o.key]["goodput_rps"] for name, c in configs.items()}
        base = goodput.get(baseline) if baseline else None
        rows.append({**o.model_dump(), "slo_scale": o.ttft_scale if o.kind == "slo_scale" else None,
                     "goodput_rps": goodput,
                     "ratio_to_baseline": {n: (g / base if base else None) for n, g in goodput.items()}})
    return rows


def headline(rows: list[dict], baseline: str, other: str, goal_ratio: float) -> dict:
    """The issue's goal: `other`'s goodput over `baseline`'s. Over SLO scales, at the tightest scale
    where the baseline still serves anything (a goodput above 0). Grid and absolute settings have
    no one tightest (each is tight on one objective and loose on the other, or belongs to its own
    application), so `by_setting` gives the ratio, and whether it reaches the goal, at each."""
    ratios = {r["key"]: r["ratio_to_baseline"][other] for r in rows if r["kind"] != "slo_scale"}
    by_setting = {key: {"ratio": q, "met": q is not None and q >= goal_ratio} for key, q in ratios.items()}
    scales = [r for r in rows if r["kind"] == "slo_scale"]
    served = [r for r in scales if r["goodput_rps"].get(baseline)]
    if not served:
        note = f"{baseline} met no scale's objectives at any rate tried" if scales else "no SLO scale judged"
        return {"slo_scale": None, "ratio": None, "goal_ratio": goal_ratio, "met": False, "note": note,
                "by_setting": by_setting}
    tightest = served[0]
    ratio = tightest["ratio_to_baseline"][other]
    return {"slo_scale": tightest["slo_scale"], "ttft_ms": tightest["ttft_ms"], "tpot_ms": tightest["tpot_ms"],
            "goodput_rps": tightest["goodput_rps"], "ratio": ratio, "goal_ratio": goal_ratio,
            "met": ratio is not None and ratio >= goal_ratio, "by_setting": by_setting}


FIXED_MODES = ("colocated", "disaggregated")


def adaptive_goal(rows: list[dict]) -> dict[str, dict]:
    """The issue's goal for adaptive mode, per setting: its goodput at least the better fixed mode's.
    Where no mode met the setting's objectives at any rate tried, goodput is 0 for all and says
    nothing of which is better: `met` is None (not judged), not a pass."""
    out = {}
    for row in rows:
        goodput = row["goodput_rps"]
        best = max((m for m in FIXED_MODES if m in goodput), key=lambda m: goodput[m])
        judged = goodput["adaptive"] > 0 or goodput[best] > 0
        out[row["key"]] = {"adaptive_rps": goodput["adaptive"], "best_fixed": best, "best_fixed_rps": goodput[best],
                           "met": goodput["adaptive"] >= goodput[best] if judged else None}
    return out


CACHE_TTFT_GOAL = 0.5
"""Cache-aware TTFT p50 at most this multiple of cache-blind's, on the same trace (issue 22)."""
CACHE_GOODPUT_GOAL = 1.5
"""Cache-aware goodput at least this multiple of cache-blind's, at the same objectives."""


def cache_goal(configs: dict[str, dict], rows: list[dict]) -> dict[str, dict]:
    """Cache-aware against cache-blind routing, per mode run both ways (`MODE/cache-blind` against
    `MODE/cache-aware`, else `MODE`): TTFT p50 and the share of prompt tokens served from cache at
    every rate both ran, and goodput at every setting. A goodput ratio over a cache-blind goodput of
    0 is null, and met when cache-aware served anything."""
    out = {}
    for blind in (n for n in configs if n.endswith("/cache-blind")):
        mode = blind.partition("/")[0]
        aware = next((n for n in (f"{mode}/cache-aware", mode) if n in configs), None)
        if aware is None:
            continue
        # A run is one rate, and one setting when requests carried their objectives.
        runs = {name: {(r["rate_rps"], r["objectives_sent"] or ""): r for r in configs[name]["runs"]}
                for name in (aware, blind)}
        by_rate = {}
        for rate, sent in sorted(set(runs[aware]) & set(runs[blind])):
            a, b = runs[aware][rate, sent], runs[blind][rate, sent]
            p50 = {name: (run["ttft_ms"] or {}).get("p50") for name, run in ((aware, a), (blind, b))}
            ratio = p50[aware] / p50[blind] if p50[aware] is not None and p50[blind] else None
            label = f"{rate:g}" + (f" {sent}" if sent else "")
            by_rate[label] = {"ttft_p50_ms": p50, "ttft_p50_ratio": ratio,
                              "met": ratio is not None and ratio <= CACHE_TTFT_GOAL,
                              "cached_prompt_fraction": {aware: a["cached_prompt_fraction"],
                                                         blind: b["cached_prompt_fraction"]}}
        by_setting = {}
        for row in rows:
            g_aware, g_blind = row["goodput_rps"][aware], row["goodput_rps"][blind]
            # Rounded: goodputs are rates tried, and 0.3 / 0.2 is 1.4999999999999998 in floating point.
            ratio = round(g_aware / g_blind, 9) if g_blind else None
            by_setting[row["key"]] = {"goodput_rps": {aware: g_aware, blind: g_blind}, "ratio": ratio,
                                      "met": ratio >= CACHE_GOODPUT_GOAL if ratio is not None else g_aware > 0}
        out[mode] = {"cache_aware": aware, "cache_blind": blind, "ttft_goal_ratio": CACHE_TTFT_GOAL,
                     "goodput_goal_ratio": CACHE_GOODPUT_GOAL, "by_rate": by_rate, "by_setting": by_setting}
    return out


def summary(report: dict) -> list[str]:
    """The report's headline figures, for a terminal."""
    ref = report["slo"]["reference"]
    lines = [f"reference objectives (scale 1, {ref['from']} unloaded p90): TTFT {ref['ttft_ms']:.0f} ms, "
             f"TPOT {ref['tpot_ms']:.1f} ms"]
    for name, c in report["configs"].items():
        added = c["calibration"].get("added_latency")
        if added:
            proxy = added.get("via_proxy")
            via = "its ingress" if added["path"] == "ingress" else "Serve's proxy"
            lines.append(f"{name}: pdserve adds {added['added_ms']['p50']:.1f} ms median TTFT in front of one engine "
                         f"through {via}"
                         + (f" ({proxy['added_ms']['p50']:.1f} ms through Serve's proxy)" if proxy else ""))
        run = next((r for r in c["runs"] if r["kv_transfer"]), None)
        if run is not None:
            kv = run["kv_transfer"]
            lines.append(f"{name}: at {run['rate_rps']:.3g} req/s, {kv['transfers']} KV transfers of "
                         f"{kv['bytes_mean'] / 2**20:.1f} MiB on average, {kv['transfer_ms']['p50']:.0f} ms median "
                         f"from prefill start, {kv['exposed_ms']['p50']:.1f} ms exposed")
    for row in report["comparison"]:
        goodput = "  ".join(f"{n} {g:.3f}" for n, g in row["goodput_rps"].items())
        label = f"scale {row['slo_scale']:g}" if row["kind"] == "slo_scale" else row["key"]
        lines.append(f"{label} (TTFT {row['ttft_ms']:.0f} ms, TPOT {row['tpot_ms']:.1f} ms): goodput req/s  {goodput}")
    if "goal" in report:
        g = report["goal"]
        if any(row["kind"] == "slo_scale" for row in report["comparison"]):
            lines.append(f"goal: disaggregated/colocated at the tightest scale colocated serves ({g['slo_scale']}): "
                         f"{g['ratio']} (target >= {g['goal_ratio']}) -> {'met' if g['met'] else 'not met'}")
        lines += [f"goal at {key}: disaggregated/colocated {s['ratio']} (target >= {g['goal_ratio']}) -> "
                  f"{'met' if s['met'] else 'not met'}" for key, s in g["by_setting"].items()]
    lines += [f"adaptive goal at {key}: adaptive {a['adaptive_rps']:.3f} req/s against {a['best_fixed']} "
              f"{a['best_fixed_rps']:.3f} (target: at least the better fixed mode) -> {_verdict(a['met'])}"
              for key, a in report.get("adaptive_goal", {}).items()]
    for mode, c in report.get("cache_goal", {}).items():
        aware, blind = c["cache_aware"], c["cache_blind"]
        lines += [f"cache goal, {mode} @ {rate} {report['workload']['rate_unit']}: TTFT p50 {_ms(r['ttft_p50_ms'][aware])} "
                  f"cache-aware against {_ms(r['ttft_p50_ms'][blind])} cache-blind, ratio {_num(r['ttft_p50_ratio'])} "
                  f"(target <= {c['ttft_goal_ratio']}) -> {'met' if r['met'] else 'not met'}; prompt tokens from "
                  f"cache {_pct(r['cached_prompt_fraction'][aware])} against {_pct(r['cached_prompt_fraction'][blind])}"
                  for rate, r in c["by_rate"].items()]
        lines += [f"cache goal, {mode} at {key}: goodput {s['goodput_rps'][aware]:.3f} against "
                  f"{s['goodput_rps'][blind]:.3f}, ratio {_num(s['ratio'])} (target >= {c['goodput_goal_ratio']}) -> "
                  f"{'met' if s['met'] else 'not met'}" for key, s in c["by_setting"].items()]
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _verdict(met: bool | None) -> str:
    if met is None:
        return "not judged: no mode met these objectives at any rate tried (attainment per run in the report)"
    return "met" if met else "not met"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


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
    judged = judged_objectives(settings, reference)
    rows = comparison(configs, judged, baseline)
    report = {
        "tool": "pdserve bench serve", "created_unix_s": time.time(), "command": sys.argv,
        "hardware": hardware(), "model": {"path": model_path},
        "workload": {**(workload.model_dump() if isinstance(workload, ConversationWorkload) else describe(workload)),
                     "rate_unit": "conversations/s" if isinstance(workload, ConversationWorkload) else "req/s",
                     "arrival": settings.arrival,
                     "burstiness": settings.burstiness if settings.arrival == "gamma" else 1.0,
                     "requests_per_rate": settings.requests_per_rate, "seed": settings.seed},
        "settings": settings.model_dump(mode="json"),
        "slo": {"reference": reference, "scales": sorted(settings.slo_scales),
                "objectives": [o.model_dump() for o in judged], "target_attainment": settings.target_attainment},
        "search_start_rps": start_rps,
        "configs": configs, "comparison": rows,
    }
    if baseline == "colocated" and "disaggregated" in configs:
        report["goal"] = headline(rows, "colocated", "disaggregated", 2.0)
    if "adaptive" in configs and set(FIXED_MODES) & set(configs):
        report["adaptive_goal"] = adaptive_goal(rows)
    if cached := cache_goal(configs, rows):
        report["cache_goal"] = cached
    return report
