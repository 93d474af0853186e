"""`pdserve bench overload`'s settings and trace, and its CLI refusing bad options before it deploys
(the figures: test_overload_report.py)."""

import json

import pytest

from pdserve.bench.overload import load_calibration
from pdserve.bench.overload_settings import OverloadSettings
from pdserve.bench.slo_compare import CALIBRATION_ROUNDS, Workload, probe_prompts, trace_within
from pdserve.cli.main import main


def test_trace_within_a_window_cuts_arrivals_at_its_end():
    specs = trace_within(Workload(burstiness=1.0), 2.0, 30.0, {"chat": (1.0, 1.0), "long": (2.0, 2.0)}, seed=3)
    assert specs[0].arrival_s == 0.0 and all(q.arrival_s < 30.0 for q in specs)
    assert specs[-1].arrival_s > 25.0  # drew enough arrivals to fill the window


def test_calibration_times_long_prompts_no_earlier_request_sent():
    """A long prompt timed twice would come from the prefix cache the second time, and objectives
    set from that (a third of an uncached prefill on 2 cores) refused every long prompt."""
    w = Workload(long_fraction=0.5)
    probes = [dict(probe_prompts(w, i))["long"] for i in range(1 + CALIBRATION_ROUNDS)]
    traced = {q.prompt for seed in (w.seed, w.seed + 1) for q in trace_within(w, 2.0, 60.0, {
        "chat": (1.0, 1.0), "long": (2.0, 2.0)}, seed)}
    assert len(set(probes)) == len(probes) and not traced & set(probes)
    assert probe_prompts(w, 3) == probe_prompts(w, 3)  # and the same in every run


@pytest.mark.parametrize("field, value", [("duration_s", 0.0), ("overload", -1.0), ("recovery_s", 0.0), ("probe_gap_s", 0.0),
                                          ("probe_max_tokens", 1)])
def test_settings_refuse_values_that_cannot_run(field, value):
    with pytest.raises(ValueError, match=field):
        OverloadSettings(**{field: value})


@pytest.mark.parametrize("args, words", [(["--duration-s", "0"], "duration_s must be > 0"),
                                         (["--overload", "-3"], "overload must be > 0"),
                                         (["--recovery-s", "soon"], "invalid float value")])
def test_cli_refuses_bad_options_before_deploying(args, words, capsys):
    try:
        code = main(["bench", "overload", *args])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code)
    assert code == 2
    assert words in capsys.readouterr().err


CALIBRATION = {"unloaded": {"chat": {"ttft_ms": 80.0, "tpot_ms": 60.0}, "long": {"ttft_ms": 3000.0, "tpot_ms": 70.0}},
               "capacity_rps": 1.2, "baseline_rps": 0.6, "overload_rps": 3.6}


def test_a_reused_calibration_gives_the_same_objectives_and_trace_as_the_run_it_came_from(tmp_path):
    report = tmp_path / "overload.json"
    report.write_text(json.dumps({"calibration": CALIBRATION}))
    cal = load_calibration(str(report))
    assert cal["unloaded"] == CALIBRATION["unloaded"] and cal["capacity_rps"] == 1.2 and cal["from"] == str(report)
    w, objectives = OverloadSettings().workload(), {"chat": (240.0, 180.0), "long": (9000.0, 210.0)}
    first = trace_within(w, 3 * CALIBRATION["capacity_rps"], 60.0, objectives, seed=1)
    again = trace_within(w, 3 * cal["capacity_rps"], 60.0, objectives, seed=1)
    assert [(q.arrival_s, q.prompt, q.kind) for q in first] == [(q.arrival_s, q.prompt, q.kind) for q in again]


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"calibration": {"unloaded": {"chat": {}}}}),
                                     json.dumps({"settings": {}})], ids=["missing", "garbage", "partial", "other"])
def test_cli_refuses_a_calibration_that_is_not_an_overload_reports_before_deploying(tmp_path, content, capsys):
    path = tmp_path / "overload.json"
    if content is not None:
        path.write_text(content)
    assert main(["bench", "overload", "--calibration", str(path)]) == 2
    assert "not an overload report with a calibration" in capsys.readouterr().err
