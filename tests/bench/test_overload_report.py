"""`pdserve bench overload`'s figures from hand-made results: the recovery rule, the memory summary, admission figures, goals and the assembled report (plot and stdout
included)."""

import json

import pytest

from pdserve.bench import overload_report
from pdserve.bench.loadgen import RequestResult, RequestSpec
from pdserve.bench.overload_report import MemorySample, Phase, Probe
from pdserve.bench.overload_settings import OverloadSettings

NORMAL = {"source": "baseline", "ttft_ms": 100.0, "tpot_ms": 20.0}
MIB = 2**20


def _result(outcome: str, ttft_ms: float | None = None, tpot_ms: float | None = None, kind: str = "chat",
            e2e_ms: float = 10.0, retry_after_s: float | None = None) -> RequestResult:
    return RequestResult(kind, outcome, {"ok": 200, "rejected": 429, "error": 500}[outcome], ttft_ms, tpot_ms, e2e_ms,
                         8 if outcome == "ok" else 0, retry_after_s, None)


def _spec(arrival_s: float, kind: str = "chat") -> RequestSpec:
    return RequestSpec(arrival_s, "q", 8, kind, 300.0, 60.0)  # objectives: TTFT 300 ms, TPOT 60 ms


def _probe(sent_after_s: float, ttft_ms: float | None = 100.0, tpot_ms: float | None = 20.0, outcome: str = "ok"
           ) -> Probe:
    return Probe(sent_after_s, outcome, ttft_ms, tpot_ms)


def test_recovered_at_the_first_probe_from_which_on_all_are_normal():
    probes = [_probe(0.0, ttft_ms=900.0), _probe(1.0), _probe(2.0, tpot_ms=31.0), _probe(3.0), _probe(4.0, 150.0)]
    assert overload_report.recovered_after_s(probes, NORMAL, 1.5) == 3.0  # 150 ms is exactly 1.5 x 100: still normal


def test_all_normal_recovers_at_once_and_a_missing_tpot_is_not_held_against_a_probe():
    assert overload_report.recovered_after_s([_probe(0.2, tpot_ms=None), _probe(1.1)], NORMAL, 1.5) == 0.2


@pytest.mark.parametrize("last", [_probe(5.0, ttft_ms=151.0), _probe(5.0, outcome="rejected", ttft_ms=None),
                                  _probe(5.0, outcome="error", ttft_ms=None)])
def test_not_recovered_while_the_last_probe_is_slow_refused_or_failed(last):
    assert overload_report.recovered_after_s([_probe(0.0), _probe(1.0), last], NORMAL, 1.5) is None


def test_no_probes_is_not_recovered():
    assert overload_report.recovered_after_s([], NORMAL, 1.5) is None


def test_normal_latency_is_the_baseline_chat_median_else_the_unloaded_one():
    unloaded = {"ttft_ms": 50.0, "tpot_ms": 10.0}
    baseline = [_result("ok", 100.0, 20.0), _result("ok", 300.0, 40.0), _result("ok", 200.0, 30.0),
                _result("ok", 5000.0, 90.0, kind="long"), _result("rejected", kind="chat")]
    assert overload_report.normal_latency(baseline, unloaded) == {"source": "baseline", "ttft_ms": 200.0, "tpot_ms": 30.0}
    only_long = [_result("ok", 5000.0, 90.0, kind="long")]
    assert overload_report.normal_latency(only_long, unloaded) == {"source": "unloaded", "ttft_ms": 50.0, "tpot_ms": 10.0}


def _memory(overload_mib: list[int]) -> list[MemorySample]:
    """1000 MiB through the baseline, then one sample a second of the overload, then recovery."""
    samples = [MemorySample(t, "baseline", 1000 * MIB) for t in (-3.0, -2.0, -1.0)]
    samples += [MemorySample(float(t), "overload", m * MIB) for t, m in enumerate(overload_mib)]
    return samples + [MemorySample(len(overload_mib) + 0.5, "recovery", 1010 * MIB)]


def test_memory_that_levels_off():
    mem = overload_report.memory_summary(_memory([1100, 1150, 1180] + [1200] * 27), duration_s=30.0)
    assert mem["peak_mib"] == {"baseline": 1000.0, "overload": 1200.0, "recovery": 1010.0}
    assert mem["overload_over_baseline_mib"] == 200.0
    assert mem["last_over_first_mib"] == 0.0  # both 10 s windows peak at 1200 MiB
    assert mem["last_over_first_fraction"] == 0.0


def test_memory_that_keeps_growing():
    mem = overload_report.memory_summary(_memory([1000 + 10 * t for t in range(30)]), duration_s=30.0)
    assert mem["last_over_first_mib"] == pytest.approx(200.0)  # peaks 1290 (last 10 s) and 1090 (first 10 s)
    assert mem["last_over_first_fraction"] == pytest.approx(0.2)


def test_memory_without_overload_samples_has_no_growth_figures():
    mem = overload_report.memory_summary([MemorySample(-1.0, "baseline", 1000 * MIB)], duration_s=30.0)
    assert mem["overload_over_baseline_mib"] is None and mem["last_over_first_fraction"] is None


def _overload_phase() -> Phase:
    results = [_result("ok", 200.0, 50.0), _result("ok", 400.0, 50.0), _result("error"),
               _result("rejected", e2e_ms=5.0, retry_after_s=2.0), _result("rejected", e2e_ms=7.0)]
    return Phase(0.0, [_spec(0.5 * i) for i in range(len(results))], results, 10.0)


def test_a_failed_request_counts_against_the_attainment_of_the_admitted():
    fig = overload_report.overload_figures(_overload_phase())
    assert (fig["admitted"], fig["rejected"], fig["error"], fig["met"]) == (3, 2, 1, 1)
    assert fig["attainment_of_admitted"] == pytest.approx(1 / 3)
    assert fig["retry_after_fraction"] == 0.5
    assert fig["reject_ms"]["p50"] == pytest.approx(6.0)


def _figures(**changes) -> dict:
    return {"attainment_of_admitted": 0.95, "reject_ms": {"p50": 5.0, "p99": 20.0}, "retry_after_fraction": 1.0,
            "by_kind": {"chat": {"requests": 10, "met": 9}, "long": {"requests": 4, "met": 1}}, **changes}


def test_goals_met():
    g = overload_report.goals(_figures(), 0, 2.0, {"last_over_first_fraction": 0.01}, OverloadSettings())
    assert {name: v["met"] for name, v in g.items()} == dict.fromkeys(g, True)


def test_goals_missed_one_by_one():
    s = OverloadSettings()
    g = overload_report.goals(_figures(attainment_of_admitted=0.89, reject_ms={"p50": 5.0, "p99": 50.0},
                                retry_after_fraction=0.99, by_kind={"chat": {"requests": 10, "met": 9},
                                                                    "long": {"requests": 4, "met": 0}}),
                              1, None, {"last_over_first_fraction": 0.06}, s)
    assert {name: v["met"] for name, v in g.items()} == dict.fromkeys(g, False)
    assert overload_report.goals(_figures(), 0, 10.5, None, s)["recovered_after_s"]["met"] is False


def test_goals_not_measured_are_neither_met_nor_missed():
    g = overload_report.goals(_figures(reject_ms=None, retry_after_fraction=None), 0, 1.0, None, OverloadSettings())
    assert g["reject_p99_ms"]["met"] is None and g["retry_after_fraction"]["met"] is None
    assert g["memory_growth_fraction"] == {"target": 0.05, "value": None, "met": None}
    assert overload_report.goals(_figures(by_kind={}), 0, 1.0, None, OverloadSettings())[
        "worst_kind_attainment"]["met"] is None


def _report(samples: list[MemorySample] | None) -> dict:
    s = OverloadSettings(duration_s=30.0, recovery_s=10.0)
    calibration = {"unloaded": {"chat": {"ttft_ms": 80.0, "tpot_ms": 15.0}, "long": {"ttft_ms": 900.0,
                                                                                     "tpot_ms": 18.0}},
                   "capacity_rps": 2.0, "baseline_rps": 1.0, "overload_rps": 6.0}
    baseline = Phase(-25.0, [_spec(0.0), _spec(1.0, "long")], [_result("ok", 100.0, 20.0),
                                                              _result("ok", 1200.0, 25.0, kind="long")], 20.0)
    probes = [_probe(0.0, ttft_ms=900.0), _probe(1.5, outcome="error", ttft_ms=None), _probe(2.5), _probe(3.5)]
    return overload_report.assemble(s, {"mode": "disaggregated"}, calibration,
                             {"chat": (240.0, 45.0), "long": (2700.0, 54.0)}, baseline, _overload_phase(), probes,
                             samples)


def test_assembled_report_has_every_phase_and_the_goals_from_the_same_figures():
    report = _report(_memory([1100] * 30))
    assert report["recovery"]["normal"] == {"source": "baseline", "ttft_ms": 100.0, "tpot_ms": 20.0}
    assert report["recovery"]["recovered_after_s"] == 2.5
    assert report["goals"]["errors"]["value"] == 2  # one failed overload request, one failed probe
    assert report["goals"]["attainment_of_admitted"]["value"] == report["overload"]["attainment_of_admitted"]
    assert report["baseline"]["ok"] == 2 and report["overload"]["rejected"] == 2
    assert [r["t_s"] for r in report["timeline"]["requests"]][:3] == [-25.0, -24.0, 0.0]
    assert report["memory"]["peak_mib"]["overload"] == 1100.0 and len(report["timeline"]["memory"]) == 34
    json.dumps(report)  # the report is written as JSON


def test_report_of_a_service_run_elsewhere_says_memory_was_not_sampled(tmp_path):
    report = _report(None)
    assert report["memory"]["sampled"] is False and report["timeline"]["memory"] == []
    assert report["goals"]["memory_growth_fraction"]["met"] is None
    json_path, png_path = overload_report.write(report, tmp_path)
    assert json.loads(json_path.read_text())["tool"] == "pdserve bench overload"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_prints_each_phase_and_each_goal(tmp_path):
    report = _report(_memory([1100] * 30))
    lines = overload_report.summary_lines(report)
    assert lines[0].startswith("offered: baseline 1.00 req/s, overload 6.00 req/s (capacity estimate 2.00 req/s")
    assert any(line.startswith("overload: 5 requests, 2 served, 2 refused, 1 failed") for line in lines)
    assert "  chat  : 5 requests, 2 served, 2 refused, 1 met" in lines  # and one such line per kind
    assert any("errors" in line and "NOT met" in line for line in lines)
    assert len([line for line in lines if line.split()[0] in report["goals"]]) == len(report["goals"])
    assert overload_report.write(report, tmp_path)[1].stat().st_size > 0  # the plot with memory sampled

