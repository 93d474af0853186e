"""The sweep's table: every workload's goodput per setting and mode, with the bounds its search left."""

from __future__ import annotations

import pytest

from pdserve.bench import sweep_report


def _workload_report(n: int, goodput: dict[str, tuple[float, float | None]]) -> dict:
    """A per-workload report as `serve_report.assemble` writes it, reduced to what the sweep reads:
    one absolute setting "app" whose goodput bracket per mode is given."""
    base = goodput["colocated"][0]
    return {
        "model": {"path": "m"}, "workload": {"requests_per_rate": n},
        "comparison": [{"key": "app", "kind": "absolute", "ttft_ms": 1000.0, "tpot_ms": 100.0,
                        "goodput_rps": {m: g for m, (g, _) in goodput.items()},
                        "ratio_to_baseline": {m: (g / base if base else None) for m, (g, _) in goodput.items()}}],
        "configs": {m: {"goodput": {"app": {"goodput_rps": g, "upper_rps": u}}} for m, (g, u) in goodput.items()},
    }


@pytest.mark.parametrize(("num", "den", "bounds"), [
    ((2.0, 4.0), (1.0, 2.0), (1.0, 4.0)),
    ((2.0, None), (1.0, 2.0), (1.0, None)),  # the numerator passed every rate tried: no upper bound
    ((2.0, 4.0), (1.0, None), (0.0, 4.0)),  # the baseline passed every rate tried: no lower bound above 0
    ((2.0, 4.0), (0.0, 0.5), (4.0, None)),  # a baseline that served nothing: no upper bound
])
def test_a_ratio_of_two_bracketed_goodputs_lies_between_the_brackets_ends(num, den, bounds):
    assert sweep_report.ratio_bounds(num, den) == bounds


def test_the_sweep_table_has_a_row_per_workload_and_setting_and_names_where_adaptive_fell_short():
    reports = {
        "chat": _workload_report(40, {"colocated": (1.0, 1.2), "disaggregated": (0.5, 0.6), "adaptive": (1.0, 1.2)}),
        "code": _workload_report(20, {"colocated": (0.4, 0.5), "disaggregated": (0.8, 1.0), "adaptive": (0.6, 0.8)}),
        "azure": _workload_report(20, {"colocated": (0.0, 0.2), "disaggregated": (0.0, 0.2), "adaptive": (0.0, 0.2)}),
    }
    report = sweep_report.assemble(reports, "colocated")
    sweep = report["sweep"]
    assert [(r["workload"], r["key"]) for r in sweep["rows"]] == [("chat", "app"), ("code", "app"), ("azure", "app")]
    code = sweep["rows"][1]
    assert code["goodput_rps"] == {"colocated": 0.4, "disaggregated": 0.8, "adaptive": 0.6}
    assert code["ratio_to_baseline"]["disaggregated"] == pytest.approx(2.0)
    assert code["ratio_bounds"]["disaggregated"] == pytest.approx([0.8 / 0.5, 1.0 / 0.4])
    # azure: no mode passed at any rate tried, so a tie at 0 says nothing: not judged, not met.
    assert [r["adaptive_at_least_best_fixed"] for r in sweep["rows"]] == [True, False, None]
    assert sweep["adaptive_goal"] == {"met": 1, "of": 2, "missed": ["code/app"], "not_judged": ["azure/app"]}
    # The coarser workload sets the step: 20 requests, one of them 0.05 of attainment.
    assert (sweep["requests_per_rate"], sweep["attainment_step"], sweep["attainment_step_ok"]) == (20, 0.05, True)
    assert report["workloads"] is reports
    lines = sweep_report.summary(report)
    assert "code app: colocated [0.4, 0.5); disaggregated [0.8, 1); adaptive [0.6, 0.8)" in lines[2]
    assert "disaggregated/colocated 2.00 (bounds 1.60-2.50)" in lines[2]
    assert lines[-1] == ("adaptive >= the better fixed mode: 1 of 2 settings (missed: code/app); not judged, "
                         "no mode passed at any rate tried: azure/app")


def test_without_a_colocated_baseline_the_sweep_gives_goodput_but_no_ratios():
    reports = {"chat": _workload_report(10, {"colocated": (1.0, None), "disaggregated": (0.5, 1.0)})}
    reports["chat"]["configs"].pop("colocated")
    reports["chat"]["comparison"][0]["goodput_rps"].pop("colocated")
    sweep = sweep_report.assemble(reports, None)["sweep"]
    assert "ratio_bounds" not in sweep["rows"][0] and "adaptive_goal" not in sweep
    assert sweep["attainment_step_ok"] is False  # 10 requests: one is 0.1 of attainment
