"""The objective settings of `pdserve bench serve` (SLO scales, TTFT x TPOT grids, absolute
objectives), the attainment and comparison rows keyed by them, and the headline ratio."""

import pytest
from pydantic import ValidationError

from pdserve.bench import conversations, plots
from pdserve.bench.loadgen import RequestResult, RequestSpec
from pdserve.bench.serve_report import (
    adaptive_goal,
    assemble,
    cache_goal,
    comparison,
    headline,
    run_section,
    summary,
    target_section,
)
from pdserve.bench.serve_settings import Run, ServeBenchSettings, Target, judged_objectives
from pdserve.bench.workloads import BUILT_IN

REFERENCE = {"ttft_ms": 200.0, "tpot_ms": 40.0, "from": "colocated"}


def _result(ttft_ms: float | None, tpot_ms: float | None, outcome: str = "ok") -> RequestResult:
    return RequestResult(kind="load", outcome=outcome, status=200 if outcome == "ok" else 429, ttft_ms=ttft_ms,
                         tpot_ms=tpot_ms, e2e_ms=1000.0, completion_tokens=8 if outcome == "ok" else 0,
                         retry_after_s=None, server_slo=None)


def _run(results: list[RequestResult], rate_rps: float = 1.0) -> Run:
    specs = [RequestSpec(float(i), [1, 2, 3], 8, "load", ignore_eos=True) for i in range(len(results))]
    return Run(rate_rps=rate_rps, duration_s=float(len(results)), specs=specs, results=results)


def _judged(**settings) -> list:
    return judged_objectives(ServeBenchSettings(**settings), REFERENCE)


def _configs(colocated: dict[str, float], disaggregated: dict[str, float]) -> dict:
    return {name: {"goodput": {key: {"goodput_rps": g} for key, g in by_key.items()}}
            for name, by_key in (("colocated", colocated), ("disaggregated", disaggregated))}


def test_keys_are_stable_strings_per_kind_of_setting():
    judged = _judged(slo_scales=[2.0, 1.0], ttft_scales=[3.0, 1.0], tpot_scales=[1.5],
                     objectives_ms=[{"name": "summarization", "ttft_ms": 15000, "tpot_ms": 160},
                                    {"ttft_ms": 1000, "tpot_ms": 200}])
    assert [(o.key, o.kind) for o in judged] == [
        ("1", "slo_scale"), ("2", "slo_scale"),  # the keys reports have always had
        ("ttft1x/tpot1.5x", "grid"), ("ttft3x/tpot1.5x", "grid"),
        ("summarization", "absolute"), ("1000ms/200ms", "absolute")]
    by_key = {o.key: o for o in judged}
    assert (by_key["2"].ttft_ms, by_key["2"].tpot_ms, by_key["2"].ttft_scale, by_key["2"].tpot_scale) == (
        400.0, 80.0, 2.0, 2.0)
    assert (by_key["ttft3x/tpot1.5x"].ttft_ms, by_key["ttft3x/tpot1.5x"].tpot_ms) == (600.0, 60.0)
    # Absolute objectives are what the operator said, whatever the reference.
    s = by_key["summarization"]
    assert (s.ttft_ms, s.tpot_ms, s.ttft_scale, s.tpot_scale) == (15000.0, 160.0, None, None)


def test_default_scales_stand_in_only_when_nothing_else_is_asked_for():
    assert ServeBenchSettings().slo_scales == [1.0, 1.5, 2.0, 3.0, 5.0]
    assert ServeBenchSettings(ttft_scales=[1, 3], tpot_scales=[1]).slo_scales == []
    assert ServeBenchSettings(objectives_ms=[{"ttft_ms": 1000, "tpot_ms": 200}]).slo_scales == []
    both = ServeBenchSettings(slo_scales=[2], objectives_ms=[{"ttft_ms": 1000, "tpot_ms": 200}])
    assert [o.key for o in judged_objectives(both, REFERENCE)] == ["2", "1000ms/200ms"]  # given together: the union


@pytest.mark.parametrize("settings, words", [
    ({"ttft_scales": [1, 3]}, "ttft_scales and tpot_scales make a grid together"),
    ({"tpot_scales": [1, 3]}, "ttft_scales and tpot_scales make a grid together"),
    ({"slo_scales": [1, 1.0]}, "slo_scales: 1 given twice"),
    ({"objectives_ms": [{"name": "chat", "ttft_ms": 1, "tpot_ms": 2}, {"name": "chat", "ttft_ms": 3, "tpot_ms": 4}]},
     "objectives_ms: chat given twice"),
    ({"objectives_ms": [{"name": "2", "ttft_ms": 1, "tpot_ms": 2}]}, "should match pattern"),  # would read as a scale
    ({"objectives_ms": [{"ttft_ms": 0, "tpot_ms": 2}]}, "greater than 0"),
    ({"slo_scales": []}, "no objectives to judge"),
])
def test_ambiguous_or_empty_objective_settings_are_refused(settings, words):
    with pytest.raises(ValidationError, match=words):
        ServeBenchSettings(**settings)


def test_a_grid_judges_every_request_of_one_run_against_each_pair_of_objectives():
    run = _run([_result(500.0, 38.0),  # TTFT 2.5x, TPOT 0.95x: met only where TTFT may be 3x
                _result(150.0, 50.0),  # TPOT 1.25x: met only where TPOT may be 1.5x
                _result(100.0, 30.0),  # met everywhere
                _result(None, None, "rejected")])  # met nowhere, still counted
    section = run_section(run, _judged(ttft_scales=[1, 3], tpot_scales=[1, 1.5]))
    assert section["attainment"] == {"ttft1x/tpot1x": 0.25, "ttft1x/tpot1.5x": 0.5,
                                     "ttft3x/tpot1x": 0.5, "ttft3x/tpot1.5x": 0.75}


def test_absolute_objectives_judge_by_their_own_milliseconds():
    run = _run([_result(12000.0, 150.0),  # a slow first token is fine for summarization only
                _result(800.0, 180.0),  # TPOT over summarization's 160 ms, within 200
                _result(900.0, 100.0),
                _result(5000.0, 100.0)])
    judged = _judged(objectives_ms=[{"name": "summarization", "ttft_ms": 15000, "tpot_ms": 160},
                                    {"ttft_ms": 1000, "tpot_ms": 200}])
    assert run_section(run, judged)["attainment"] == {"summarization": 0.75, "1000ms/200ms": 0.5}


def test_rows_give_objectives_goodput_and_ratio_per_scale():
    rows = comparison(_configs({"1": 0.0, "2": 0.5}, {"1": 0.2, "2": 1.5}), _judged(slo_scales=[2.0, 1.0]),
                      "colocated")
    assert [r["slo_scale"] for r in rows] == [1.0, 2.0]
    assert (rows[1]["ttft_ms"], rows[1]["tpot_ms"]) == (400.0, 80.0)
    assert rows[0]["ratio_to_baseline"] == {"colocated": None, "disaggregated": None}  # colocated served nothing
    assert rows[1]["ratio_to_baseline"] == {"colocated": 1.0, "disaggregated": 3.0}


def test_rows_list_every_grid_and_absolute_setting_with_its_objectives():
    judged = _judged(ttft_scales=[3], tpot_scales=[1.5], objectives_ms=[{"name": "code", "ttft_ms": 1000,
                                                                        "tpot_ms": 200}])
    rows = comparison(_configs({"ttft3x/tpot1.5x": 0.5, "code": 0.0}, {"ttft3x/tpot1.5x": 1.25, "code": 0.25}),
                      judged, "colocated")
    assert [(r["key"], r["kind"], r["slo_scale"], r["ttft_ms"], r["tpot_ms"]) for r in rows] == [
        ("ttft3x/tpot1.5x", "grid", None, 600.0, 60.0), ("code", "absolute", None, 1000.0, 200.0)]
    assert rows[0]["goodput_rps"] == {"colocated": 0.5, "disaggregated": 1.25}
    assert rows[0]["ratio_to_baseline"]["disaggregated"] == 2.5
    assert rows[1]["ratio_to_baseline"]["disaggregated"] is None


def test_headline_is_taken_at_the_tightest_scale_colocated_still_serves():
    rows = comparison(_configs({"1": 0.0, "2": 0.5, "3": 1.0}, {"1": 0.2, "2": 0.9, "3": 3.0}),
                      _judged(slo_scales=[1.0, 2.0, 3.0]), "colocated")
    goal = headline(rows, "colocated", "disaggregated", 2.0)
    assert goal["slo_scale"] == 2.0 and goal["ratio"] == 1.8 and goal["met"] is False
    rows = comparison(_configs({"1": 0.25}, {"1": 0.5}), _judged(slo_scales=[1.0]), "colocated")
    assert headline(rows, "colocated", "disaggregated", 2.0)["met"] is True


def test_headline_when_colocated_never_met_the_objectives():
    rows = comparison(_configs({"1": 0.0}, {"1": 0.4}), _judged(slo_scales=[1.0]), "colocated")
    goal = headline(rows, "colocated", "disaggregated", 2.0)
    assert goal["slo_scale"] is None and goal["met"] is False and "colocated" in goal["note"]


def test_headline_gives_the_ratio_at_every_grid_and_absolute_setting():
    judged = _judged(slo_scales=[2], ttft_scales=[3], tpot_scales=[1],
                     objectives_ms=[{"name": "summarization", "ttft_ms": 15000, "tpot_ms": 160}])
    rows = comparison(_configs({"2": 0.5, "ttft3x/tpot1x": 0.0, "summarization": 0.4},
                               {"2": 0.5, "ttft3x/tpot1x": 0.3, "summarization": 1.0}), judged, "colocated")
    goal = headline(rows, "colocated", "disaggregated", 2.0)
    assert (goal["slo_scale"], goal["ratio"], goal["met"]) == (2.0, 1.0, False)  # the scales' headline as before
    assert goal["by_setting"] == {"ttft3x/tpot1x": {"ratio": None, "met": False},
                                  "summarization": {"ratio": 2.5, "met": True}}
    only_absolute = headline(rows[2:], "colocated", "disaggregated", 2.0)
    assert only_absolute["slo_scale"] is None and only_absolute["note"] == "no SLO scale judged"
    assert only_absolute["by_setting"] == {"summarization": {"ratio": 2.5, "met": True}}


def test_adaptive_is_judged_against_the_better_fixed_mode_at_every_setting_where_any_mode_passed():
    configs = _configs({"1": 0.0, "2": 0.5, "3": 1.0, "0.5": 0.0}, {"1": 0.2, "2": 0.25, "3": 1.0, "0.5": 0.0})
    configs["adaptive"] = {"goodput": {"1": {"goodput_rps": 0.4}, "2": {"goodput_rps": 0.25},
                                       "3": {"goodput_rps": 1.0}, "0.5": {"goodput_rps": 0.0}}}
    rows = comparison(configs, _judged(slo_scales=[0.5, 1.0, 2.0, 3.0]), "colocated")
    goal = adaptive_goal(rows)
    assert goal["1"] == {"adaptive_rps": 0.4, "best_fixed": "disaggregated", "best_fixed_rps": 0.2, "met": True}
    assert goal["2"] == {"adaptive_rps": 0.25, "best_fixed": "colocated", "best_fixed_rps": 0.5, "met": False}
    assert goal["3"]["met"] is True  # a tie meets it
    assert goal["0.5"]["met"] is None  # a tie at 0 does not: no mode passed at any rate tried
    report = {"slo": {"reference": REFERENCE}, "comparison": rows, "adaptive_goal": goal,
              "configs": {name: {"calibration": {}, "runs": []} for name in configs}}
    assert ("adaptive goal at 2: adaptive 0.250 req/s against colocated 0.500 (target: at least the better fixed "
            "mode) -> not met") in summary(report)
    assert ("adaptive goal at 0.5: adaptive 0.000 req/s against colocated 0.000 (target: at least the better fixed "
            "mode) -> not judged: no mode met these objectives at any rate tried (attainment per run in the report)"
            ) in summary(report)


def test_summary_prints_one_line_per_setting():
    judged = _judged(slo_scales=[2], ttft_scales=[3], tpot_scales=[1.5],
                     objectives_ms=[{"name": "summarization", "ttft_ms": 15000, "tpot_ms": 160}])
    rows = comparison(_configs({"2": 0.5, "ttft3x/tpot1.5x": 0.5, "summarization": 0.4},
                               {"2": 1.0, "ttft3x/tpot1.5x": 0.75, "summarization": 1.0}), judged, "colocated")
    report = {"slo": {"reference": REFERENCE},
              "configs": {name: {"calibration": {}, "runs": []} for name in ("colocated", "disaggregated")},
              "comparison": rows, "goal": headline(rows, "colocated", "disaggregated", 2.0)}
    lines = summary(report)
    assert "scale 2 (TTFT 400 ms, TPOT 80.0 ms): goodput req/s  colocated 0.500  disaggregated 1.000" in lines
    assert "ttft3x/tpot1.5x (TTFT 600 ms, TPOT 60.0 ms): goodput req/s  colocated 0.500  disaggregated 0.750" in lines
    assert "summarization (TTFT 15000 ms, TPOT 160.0 ms): goodput req/s  colocated 0.400  disaggregated 1.000" in lines
    assert "goal at summarization: disaggregated/colocated 2.5 (target >= 2.0) -> met" in lines
    assert "goal at ttft3x/tpot1.5x: disaggregated/colocated 1.5 (target >= 2.0) -> not met" in lines


def test_a_report_of_absolute_objectives_keys_goodput_by_them_and_plots_bars(tmp_path):
    """Fixed rates 1 and 2 req/s; TTFT grows with the rate, twice as fast for colocated."""
    settings = ServeBenchSettings(rates_rps=[1.0, 2.0], objectives_ms=[{"name": "code", "ttft_ms": 1000,
                                                                         "tpot_ms": 200}])
    judged = judged_objectives(settings, REFERENCE)
    configs = {}
    for name, ttft_ms_per_rps in (("colocated", 800.0), ("disaggregated", 400.0)):
        runs = [_run([_result(ttft_ms_per_rps * r, 50.0)] * 4, r) for r in (1.0, 2.0)]
        configs[name] = target_section(Target(name, "http://fake", "m", None, {"mode": name}), {}, runs, judged,
                                       settings, {})
    assert configs["colocated"]["goodput"]["code"]["goodput_rps"] == 1.0
    assert configs["colocated"]["goodput"]["code"]["upper_rps"] == 2.0
    assert configs["disaggregated"]["goodput"]["code"]["goodput_rps"] == 2.0
    report = assemble(settings, BUILT_IN["code"], configs, REFERENCE, 1.0, "model", "colocated")
    assert report["slo"]["scales"] == [] and [o["key"] for o in report["slo"]["objectives"]] == ["code"]
    assert report["comparison"][0]["ratio_to_baseline"]["disaggregated"] == 2.0
    assert report["goal"]["by_setting"] == {"code": {"ratio": 2.0, "met": True}}
    # No SLO scale, so no plot against one: the bars instead.
    assert [p.name for p in plots.write_all(report, tmp_path)] == ["goodput_settings.png", "latency.png"]


def _turn(kind: str, ttft_ms: float, cached_tokens: int) -> RequestResult:
    result = _result(ttft_ms, 50.0)
    result.kind, result.prompt_tokens, result.cached_tokens = kind, 400, cached_tokens
    return result


def test_cache_aware_routing_is_judged_against_cache_blind_on_the_same_conversation_runs(tmp_path):
    """At 0.1 and 0.2 conversations/s; later turns hit the cache when routed to it (cache-aware)
    and half the time by chance (cache-blind), and their TTFT follows the cached share."""
    settings = ServeBenchSettings(rates_rps=[0.1, 0.2], objectives_ms=[{"name": "chat", "ttft_ms": 300,
                                                                         "tpot_ms": 200}])
    judged = judged_objectives(settings, REFERENCE)
    configs = {}
    for name, hits in (("colocated", [True, True]), ("colocated/cache-blind", [True, False])):
        turns = [_turn("first_turn", 400.0, 0)] * 2 + [_turn("later_turn", 100.0 if h else 400.0, 256 if h else 0)
                                                        for h in hits] * 3
        runs = [_run(turns, r) for r in (0.1, 0.2)]
        configs[name] = target_section(Target(name, "http://fake", "m", None, {}), {}, runs, judged, settings, {})
    report = assemble(settings, conversations.BUILT_IN["multi-turn"], configs, REFERENCE, 0.1, "model", "colocated")
    assert report["workload"]["rate_unit"] == "conversations/s" and report["workload"]["turns_mean"] == 2.0
    run = report["configs"]["colocated"]["runs"][0]
    assert run["cached_prompt_fraction"] == pytest.approx(6 * 256 / (8 * 400))
    assert run["by_kind"]["later_turn"]["ttft_ms"]["p50"] == 100.0 and run["by_kind"]["first_turn"]["requests"] == 2
    goal = report["cache_goal"]["colocated"]
    assert (goal["cache_aware"], goal["cache_blind"]) == ("colocated", "colocated/cache-blind")
    by_rate = goal["by_rate"]["0.1"]
    assert by_rate["ttft_p50_ms"] == {"colocated": 100.0, "colocated/cache-blind": 400.0}
    assert by_rate["ttft_p50_ratio"] == 0.25 and by_rate["met"]
    # 6 of 8 turns meet 300 ms cache-aware, 5 of 8 cache-blind: neither reaches 90%, so no goodput either way.
    assert goal["by_setting"]["chat"] == {"goodput_rps": {"colocated": 0.0, "colocated/cache-blind": 0.0},
                                          "ratio": None, "met": False}
    assert any(line.startswith("cache goal, colocated @ 0.1 conversations/s: TTFT p50 100 ms cache-aware against "
                               "400 ms cache-blind, ratio 0.25 (target <= 0.5) -> met; prompt tokens from cache 48% "
                               "against 24%") for line in summary(report))
    assert "latency.png" in [p.name for p in plots.write_all(report, tmp_path)]


def test_a_goodput_of_rates_tried_one_and_a_half_times_cache_blinds_meets_the_goal():
    """0.3 / 0.2 is 1.4999999999999998 in floating point (a real run's report said "not met")."""
    configs = {name: {"runs": []} for name in ("colocated", "colocated/cache-blind")}
    rows = [{"key": "scale 2", "goodput_rps": {"colocated": 0.3, "colocated/cache-blind": 0.2}}]
    setting = cache_goal(configs, rows)["colocated"]["by_setting"]["scale 2"]
    assert setting["ratio"] == 1.5 and setting["met"]
