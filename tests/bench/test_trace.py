"""Replay traces: phases parse, arrivals follow the schedule's rates, gamma arrivals are
burstier at the same rate, lengths come from the workload, and a seed fixes everything."""

import numpy as np
import pytest

from pdserve.bench.trace import Phase, arrival_times, make_trace, parse_phases
from pdserve.bench.workloads import BUILT_IN
from pdserve.controller.autoscaling.trace import load_trace, write_trace


def test_phases_parse_and_bad_ones_say_which_part_is_wrong():
    assert parse_phases("0.5:300, 2:60,0:30") == [Phase(0.5, 300), Phase(2, 60), Phase(0, 30)]
    with pytest.raises(ValueError, match="'2' is not RATE:DURATION_S"):
        parse_phases("1:10,2")
    with pytest.raises(ValueError, match="'-1:10': the rate must be >= 0"):
        parse_phases("-1:10")
    with pytest.raises(ValueError, match="the duration > 0"):
        parse_phases("1:0")


def test_poisson_arrivals_follow_each_phase_rate_and_an_idle_phase_has_none():
    times = np.array(arrival_times([Phase(2, 500), Phase(0, 100), Phase(10, 100)], seed=3))
    assert np.all(np.diff(times) >= 0) and times[0] > 0 and times[-1] < 700
    first, idle, last = (np.sum((times >= a) & (times < b)) for a, b in ((0, 500), (500, 600), (600, 700)))
    assert first == pytest.approx(1000, abs=4 * np.sqrt(1000))
    assert idle == 0
    assert last == pytest.approx(1000, abs=4 * np.sqrt(1000))


def test_gamma_arrivals_are_burstier_at_the_same_mean_rate():
    poisson = np.diff(arrival_times([Phase(5, 2000)], "poisson", seed=1))
    bursty = np.diff(arrival_times([Phase(5, 2000)], "gamma", burstiness=4.0, seed=1))
    for gaps in (poisson, bursty):
        assert np.mean(gaps) == pytest.approx(0.2, rel=0.1)
    assert np.var(poisson) / np.mean(poisson) ** 2 == pytest.approx(1.0, rel=0.15)
    assert np.var(bursty) / np.mean(bursty) ** 2 == pytest.approx(4.0, rel=0.3)
    with pytest.raises(ValueError, match="burstiness must be > 0"):
        arrival_times([Phase(1, 10)], "gamma", burstiness=0)


def test_a_trace_has_the_workload_lengths_is_fixed_by_its_seed_and_reads_back(tmp_path):
    phases = parse_phases("1:200,3:200")
    trace = make_trace(BUILT_IN["summarization"], phases, seed=5)
    assert trace == make_trace(BUILT_IN["summarization"], phases, seed=5)
    assert trace != make_trace(BUILT_IN["summarization"], phases, seed=6)
    assert np.mean([r.prompt_tokens for r in trace]) == pytest.approx(781, rel=0.1)
    assert np.mean([r.output_tokens for r in trace]) == pytest.approx(56, rel=0.1)
    assert write_trace(tmp_path / "t.jsonl", trace) == len(trace)
    assert load_trace(tmp_path / "t.jsonl") == trace
