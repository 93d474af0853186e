"""The sweep of `pdserve bench serve --workloads`: every workload's goodput at every objective
setting and in every configuration, in one table, with the uncertainty the measurement leaves.

Two sources of uncertainty are stated, not hidden:
- the goodput search stops with goodput bracketed: a rate that passed and the next one that
  failed (`upper_rps`; none when every rate tried passed), so a ratio of two goodputs lies
  between the ratios of the brackets' ends (`ratio_bounds`);
- attainment is counted in requests: with n requests per rate one request moves it by 1/n,
  and a reader can trust a pass or a miss at the 0.9 target only when that step is small
  (`attainment_step`, at most 0.05 for `attainment_step_ok`).
Pure: it reads the per-workload reports that `serve_report.assemble` built.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from pdserve.bench.hardware import hardware
from pdserve.bench.serve_report import FIXED_MODES

MAX_ATTAINMENT_STEP = 0.05
"""One request may change attainment by at most this much for a rate's pass or miss to count."""


def ratio_bounds(num: tuple[float, float | None], den: tuple[float, float | None]) -> tuple[float, float | None]:
    """Bounds of a/b where a lies in [num[0], num[1]) and b in [den[0], den[1]); None as an upper
    end is unbounded (every rate tried passed, or b may be 0)."""
    (a_lo, a_hi), (b_lo, b_hi) = num, den
    lower = a_lo / b_hi if b_hi else 0.0
    upper = a_hi / b_lo if a_hi is not None and b_lo > 0 else None
    return lower, upper


def _rows(name: str, report: dict, baseline: str | None) -> list[dict]:
    rows = []
    for comp in report["comparison"]:
        key = comp["key"]
        bracket = {mode: (cfg["goodput"][key]["goodput_rps"], cfg["goodput"][key]["upper_rps"])
                   for mode, cfg in report["configs"].items()}
        row: dict[str, Any] = {
            "workload": name, "key": key, "kind": comp["kind"], "ttft_ms": comp["ttft_ms"], "tpot_ms": comp["tpot_ms"],
            "goodput_rps": {mode: lo for mode, (lo, _) in bracket.items()},
            "upper_rps": {mode: hi for mode, (_, hi) in bracket.items()},
        }
        if baseline:
            row["ratio_to_baseline"] = comp["ratio_to_baseline"]
            row["ratio_bounds"] = {mode: list(ratio_bounds(b, bracket[baseline])) for mode, b in bracket.items()}
        fixed = [m for m in FIXED_MODES if m in bracket]
        if "adaptive" in bracket and fixed:
            best = max(fixed, key=lambda m: bracket[m][0])
            judged = bracket["adaptive"][0] > 0 or bracket[best][0] > 0  # else no mode passed at any rate: None
            row["adaptive_at_least_best_fixed"] = bracket["adaptive"][0] >= bracket[best][0] if judged else None
        rows.append(row)
    return rows


def assemble(reports: dict[str, dict], baseline: str | None) -> dict:
    """The sweep's report: the table, its goals, and every workload's own report."""
    first = next(iter(reports.values()))
    n = min(r["workload"]["requests_per_rate"] for r in reports.values())
    rows = [row for name, rep in reports.items() for row in _rows(name, rep, baseline)]
    sweep: dict[str, Any] = {
        "baseline": baseline, "requests_per_rate": n, "attainment_step": 1 / n,
        "attainment_step_ok": 1 / n <= MAX_ATTAINMENT_STEP, "rows": rows,
    }
    compared = [r for r in rows if "adaptive_at_least_best_fixed" in r]
    if compared:
        judged = [r for r in compared if r["adaptive_at_least_best_fixed"] is not None]
        missed = [f"{r['workload']}/{r['key']}" for r in judged if not r["adaptive_at_least_best_fixed"]]
        unjudged = [f"{r['workload']}/{r['key']}" for r in compared if r["adaptive_at_least_best_fixed"] is None]
        sweep["adaptive_goal"] = {"met": len(judged) - len(missed), "of": len(judged), "missed": missed,
                                  "not_judged": unjudged}
    return {"tool": "pdserve bench serve", "created_unix_s": time.time(), "command": sys.argv,
            "hardware": hardware(), "model": first["model"], "sweep": sweep, "workloads": reports}


def _bracket(lo: float, hi: float | None) -> str:
    return f"[{lo:.3g}, {'inf' if hi is None else format(hi, '.3g')})"


def summary(report: dict) -> list[str]:
    """The sweep's table, one line per workload and setting."""
    sweep = report["sweep"]
    modes = list(next(iter(report["workloads"].values()))["configs"])
    lines = [f"sweep: goodput (req/s) in [a rate that passed, the next that failed) per workload and setting; "
             f"{sweep['requests_per_rate']} requests per rate, one request = {sweep['attainment_step']:.3f} "
             f"of attainment ({'within' if sweep['attainment_step_ok'] else 'above'} the "
             f"{MAX_ATTAINMENT_STEP} a reader can trust)"]
    for row in sweep["rows"]:
        cells = [f"{m} {_bracket(row['goodput_rps'][m], row['upper_rps'][m])}" for m in modes]
        if sweep["baseline"]:
            cells += [f"{m}/{sweep['baseline']} {_ratio(row, m)}" for m in modes if m != sweep["baseline"]]
        lines.append(f"  {row['workload']} {row['key']}: " + "; ".join(cells))
    if goal := sweep.get("adaptive_goal"):
        lines.append(f"adaptive >= the better fixed mode: {goal['met']} of {goal['of']} settings"
                     + (f" (missed: {', '.join(goal['missed'])})" if goal["missed"] else "")
                     + (f"; not judged, no mode passed at any rate tried: {', '.join(goal['not_judged'])}"
                        if goal["not_judged"] else ""))
    return lines


def _ratio(row: dict, mode: str) -> str:
    ratio = row["ratio_to_baseline"][mode]
    lo, hi = row["ratio_bounds"][mode]
    return f"{'-' if ratio is None else format(ratio, '.2f')} (bounds {lo:.2f}-{'inf' if hi is None else format(hi, '.2f')})"
