"""The autoscaling dry run: the replayed decisions honour the policy's delays, replicas start
late, GPU time and cost add up, bad traces are named by line, and too few replicas show."""

import pytest

from pdserve.config.autoscaling_policy import parse_policy
from pdserve.controller.autoscaling.replay import replay
from pdserve.controller.autoscaling.trace import TraceError, TraceRequest, load_trace, write_trace


def _steady(rate_rps: float, duration_s: float, start_s: float = 0.0) -> list[TraceRequest]:
    """Evenly spaced 100-token prompts with 50-token answers."""
    return [TraceRequest(start_s + i / rate_rps, 100, 50) for i in range(int(rate_rps * duration_s))]


STEP_TRACE = _steady(1, 300) + _steady(5, 300, 300) + _steady(1, 900, 600)
"""With the CPU profile: 1 prefill and 1 decode replica at 1 req/s; 2 and 4 at 5 req/s."""


def _policy(prefill: dict | None = None, decode: dict | None = None, **top):
    pace = {"upscale_delay_s": 30, "downscale_delay_s": 120, "max_step": 8}
    return parse_policy({"interval_s": 10, "window_s": 30, **top,
                         "prefill": {**pace, **(prefill or {})}, "decode": {**pace, **(decode or {})}})


# Demand from arrival rates only: the sizes follow the trace, whatever the pools' state.
DEMAND_ONLY = _policy({"signals": ["prompt_tokens_per_s"]}, {"signals": ["output_tokens_per_s"]})


def _first(rows, pred):
    return next(row for row in rows if pred(row))


def test_a_load_step_up_then_down_raises_wanted_replicas_and_brings_them_back_after_the_delays():
    rows = replay(STEP_TRACE, DEMAND_ONLY).timeline
    assert all(row.wanted == {"prefill": 1, "decode": 1} for row in rows if row.t_s < 300)
    up = _first(rows, lambda r: r.wanted["decode"] > 1)
    assert 300 + 30 <= up.t_s <= 300 + 30 + 30  # the window sees the step within 30 s, then 30 s of delay
    peak = _first(rows, lambda r: r.t_s >= 600)
    assert peak.wanted == {"prefill": 2, "decode": 4}
    down = _first(rows, lambda r: r.t_s > 600 and r.wanted["decode"] < 4)
    assert 600 + 120 <= down.t_s <= 600 + 120 + 30
    assert "for 120 s" in down.reasons[1]
    assert rows[-1].wanted == {"prefill": 1, "decode": 1}


def test_added_replicas_serve_startup_s_after_they_are_requested_and_removed_ones_stop_at_once():
    slow = replay(STEP_TRACE, DEMAND_ONLY, startup_s=60).timeline
    asked = _first(slow, lambda r: r.wanted["decode"] > 1)
    served = _first(slow, lambda r: r.ready["decode"] > 1)
    assert served.t_s == asked.t_s + 60
    assert all(r.ready["decode"] <= r.wanted["decode"] for r in slow)
    assert all(r.ready == r.wanted for r in slow if r.t_s >= 600)  # shrinking is immediate
    instant = replay(STEP_TRACE, DEMAND_ONLY, startup_s=0)
    assert all(r.ready == r.wanted for r in instant.timeline)
    assert instant.summary.attainment > replay(STEP_TRACE, DEMAND_ONLY, startup_s=60).summary.attainment


def test_gpu_hours_count_from_the_request_and_are_priced_per_accelerator_type():
    policy = _policy({"min_replicas": 1, "max_replicas": 1, "gpus_per_replica": 2, "accelerator_type": "H100"},
                     {"min_replicas": 2, "max_replicas": 2, "gpus_per_replica": 1, "accelerator_type": "L4"},
                     interval_s=60, gpu_cost_per_hour={"H100": 4.0, "L4": 1.5})
    trace = [TraceRequest(0.0, 10, 5), TraceRequest(3599.0, 10, 5)]  # one hour of decisions: 60 x 60 s
    # Decode starts at 1 replica and is raised to its minimum of 2 at once; the second starts for 10 minutes.
    result = replay(trace, policy, startup_s=600, initial_replicas={"prefill": 1, "decode": 1})
    assert result.timeline[0].ready["decode"] == 1 and result.timeline[10].ready["decode"] == 2
    s = result.summary
    assert s.duration_s == 3600
    assert s.gpu_hours == pytest.approx({"H100": 1 * 2 * 1.0, "L4": 2 * 1 * 1.0})
    assert s.cost == pytest.approx(2.0 * 4.0 + 2.0 * 1.5)
    assert s.peak_replicas == {"prefill": 1, "decode": 2}
    assert s.scale_events == {"prefill": {"up": 0, "down": 0}, "decode": {"up": 1, "down": 0}}


@pytest.mark.parametrize("bad_line, words", [
    ("{not json", "Expecting property name"),
    ('{"arrival_s": 3, "prompt_tokens": 0, "output_tokens": 4}', "prompt_tokens must be an integer >= 1, got 0"),
    ('{"arrival_s": 3, "prompt_tokens": 8}', "output_tokens must be an integer >= 1, got None"),
    ('{"arrival_s": -1, "prompt_tokens": 8, "output_tokens": 4}', "arrival_s must be a number >= 0"),
    ('{"arrival_s": 0.5, "prompt_tokens": 8, "output_tokens": 4}', "is before the previous request's 1"),
    ("[1, 2, 3]", "expected a JSON object"),
])
def test_a_bad_trace_line_is_named_by_file_and_line_number(tmp_path, bad_line, words):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 1, "prompt_tokens": 8, "output_tokens": 4}\n\n' + bad_line + "\n")
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert f"{path}:3: " in str(err.value) and words in str(err.value)


def test_an_empty_or_missing_trace_is_refused_and_a_written_one_reads_back(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="holds no requests"):
        load_trace(tmp_path / "empty.jsonl")
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(tmp_path / "absent.jsonl")
    assert write_trace(tmp_path / "t.jsonl", STEP_TRACE[:5]) == 5
    assert load_trace(tmp_path / "t.jsonl") == STEP_TRACE[:5]


def _long_prompts(rate_rps: float, duration_s: float, start_s: float = 0.0) -> list[TraceRequest]:
    return [TraceRequest(start_s + i / rate_rps, 1000, 2) for i in range(int(rate_rps * duration_s))]


@pytest.mark.parametrize("trace, objective", [
    (STEP_TRACE, "tpot_attainment"),  # decode-heavy: the capped decode pool's batches grow
    (_long_prompts(0.5, 300) + _long_prompts(2, 300, 300), "ttft_attainment"),  # prefill-heavy: the backlog grows
])
def test_attainment_drops_when_max_replicas_is_too_small_for_the_load(trace, objective):
    roomy = replay(trace, _policy(), startup_s=30).summary
    capped = replay(trace, _policy({"max_replicas": 1}, {"max_replicas": 1}), startup_s=30).summary
    assert capped.peak_replicas == {"prefill": 1, "decode": 1}
    assert getattr(capped, objective) < getattr(roomy, objective) - 0.1
    assert capped.attainment < roomy.attainment - 0.1
    assert capped.gpu_hours["cpu"] < roomy.gpu_hours["cpu"]


def test_noise_on_measured_latency_is_seeded_and_reaches_the_decision():
    quiet = replay(STEP_TRACE, _policy())
    noisy = replay(STEP_TRACE, _policy(), noise=0.3, seed=7)
    assert noisy.to_dict() == replay(STEP_TRACE, _policy(), noise=0.3, seed=7).to_dict()
    assert [r.reasons for r in noisy.timeline] != [r.reasons for r in quiet.timeline]
    assert [r.wanted for r in noisy.timeline] != [r.wanted for r in quiet.timeline]
