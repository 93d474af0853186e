"""`pdserve bench overload`'s settings and trace, and its CLI refusing bad options before it deploys
(the figures: test_overload_report.py)."""

import pytest

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
