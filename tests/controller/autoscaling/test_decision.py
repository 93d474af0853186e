"""The sizing decision: demand over capacity, delays, steps, hysteresis and the GPU budget."""

import random
from itertools import pairwise

import pytest

from pdserve.config.autoscaling_policy import PolicyError, parse_policy
from pdserve.controller.autoscaling.decision import Memory, PoolSignals, Signals, desired_replicas

PROMPT, OUTPUT = 200, 100


def policy(**over):
    base = {"interval_s": 10,
            "prefill": {"min_replicas": 1, "max_replicas": 10, "upscale_delay_s": 30, "downscale_delay_s": 120,
                        "max_step": 10, "ttft_ms": 2000},
            "decode": {"min_replicas": 1, "max_replicas": 10, "upscale_delay_s": 30, "downscale_delay_s": 120,
                       "max_step": 10, "tpot_ms": 200}}
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return parse_policy(base)


def signals(now_s, rps, replicas, queued=0.0, running=None, measured=(None, None), kv=0.0):
    """Steady load of `rps` requests of PROMPT/OUTPUT tokens on pools of `replicas` = (prefill, decode)."""
    running = rps * OUTPUT * 0.2 if running is None else running  # Little's law at 200 ms per token
    return Signals(now_s, rps, rps * PROMPT, rps * OUTPUT,
                   PoolSignals(replicas[0], queued_prefill_tokens=queued, measured_ms=measured[0]),
                   PoolSignals(replicas[1], running_seqs=running, kv_usage=kv, measured_ms=measured[1]))


def run(p, loads, start=(1, 1), noise=None):
    """Feed one decision per interval with `loads` (req/s per interval); return the sizes over time."""
    sizes, mem, replicas = [], Memory(), start
    for i, rps in enumerate(loads):
        s = signals(i * p.interval_s, rps, replicas)
        if noise:
            s = noise(s)
        out = desired_replicas(s, p, mem)
        mem, replicas = out.memory, (out.prefill.replicas, out.decode.replicas)
        sizes.append(replicas)
    return sizes


def test_capacity_arithmetic_matches_the_profile():
    p = policy()
    out = desired_replicas(signals(0, 1.0, (1, 1)), p)
    prof = p.prefill.profile
    # One replica at TTFT T takes (T/2 - base) / (per_token x T/2) tokens per ms, at 80% utilization.
    assert out.prefill.capacity_per_replica == pytest.approx(1000 * (1000 - prof.prefill_base_ms)
                                                             / (prof.prefill_ms_per_token * 1000) * 0.8)
    context = PROMPT + OUTPUT / 2
    per_seq = p.decode.profile.decode_ms_per_seq + p.decode.profile.decode_ms_per_1k_context_tokens * context / 1000
    assert out.decode.capacity_per_replica == pytest.approx((200 - p.decode.profile.decode_base_ms) / per_seq * 0.8)
    assert out.decode.demand == pytest.approx(1.0 * OUTPUT * 0.2)
    assert "prompt tok/s" in out.prefill.reason and "seqs" in out.decode.reason


def test_load_step_up_waits_the_upscale_delay_then_grows_both_pools():
    p = policy()
    sizes = run(p, [0.2] * 3 + [6.0] * 8)
    assert sizes[3] == (1, 1)  # the step just arrived
    grown = next(i for i, s in enumerate(sizes) if s != (1, 1))
    assert grown == 3 + 3  # 30 s upscale delay at 10 s intervals
    assert sizes[-1][0] > 1 and sizes[-1][1] > 1


def test_load_step_down_waits_the_longer_downscale_delay_then_returns_to_minimum():
    p = policy()
    sizes = run(p, [6.0] * 8 + [0.1] * 20)
    high = sizes[7]
    assert all(s == high for s in sizes[8:8 + 12])  # 120 s downscale delay
    assert sizes[-1] == (1, 1)


def test_spike_shorter_than_the_delay_changes_nothing():
    p = policy()
    assert set(run(p, [0.2] * 3 + [8.0] * 2 + [0.2] * 6)) == {(1, 1)}


def test_slow_ramp_grows_monotonically_within_the_step_limit():
    p = policy(prefill={"max_step": 1}, decode={"max_step": 1})
    sizes = run(p, [0.2 + 0.1 * i for i in range(60)])
    for a, b in pairwise(sizes):
        assert 0 <= b[0] - a[0] <= 1 and 0 <= b[1] - a[1] <= 1
    assert sizes[-1][0] >= 2 and sizes[-1][1] >= 2


def test_noisy_signals_do_not_make_sizes_oscillate():
    p = policy(prefill={"upscale_delay_s": 20, "downscale_delay_s": 60},
               decode={"upscale_delay_s": 20, "downscale_delay_s": 60})
    rng = random.Random(7)

    def jitter(s):
        f = rng.uniform(0.75, 1.25)
        return Signals(s.now_s, s.arrival_rps * f, s.prompt_tokens_per_s * f, s.output_tokens_per_s * f,
                       s.prefill, PoolSignals(s.decode.replicas, running_seqs=s.decode.running_seqs * f))

    sizes = run(p, [3.0] * 120, noise=jitter)
    grown = sizes[3:]  # after the first upscale delay
    changes = sum(a != b for a, b in pairwise(grown))
    assert changes <= 2, grown
    assert all(b[0] >= a[0] and b[1] >= a[1] for a, b in pairwise(grown)), "shrank under a steady mean load"


def test_measured_latency_above_prediction_sizes_the_pool_up():
    p = policy()
    calm = desired_replicas(signals(0, 2.0, (2, 2)), p)
    slow = desired_replicas(signals(0, 2.0, (2, 2), measured=(None, 400.0)), p)
    assert slow.decode.correction > 1.5
    assert slow.decode.needed > calm.decode.needed


def test_queued_prefill_tokens_count_as_demand_to_drain():
    p = policy()
    idle = desired_replicas(signals(0, 0.5, (1, 1)), p)
    backlog = desired_replicas(signals(0, 0.5, (1, 1), queued=20_000), p)
    assert backlog.prefill.demand == pytest.approx(idle.prefill.demand + 20_000 / p.backlog_drain_s)
    assert backlog.prefill.needed > idle.prefill.needed


def test_kv_usage_alone_can_ask_for_decode_replicas():
    p = policy()
    out = desired_replicas(signals(0, 0.1, (1, 2), kv=0.95), p)
    assert out.decode.needed == 3  # 2 x 0.95 used / 0.85 target
    assert "KV 95%" in out.decode.reason


def test_unreachable_objective_keeps_the_size_and_says_why():
    p = policy(prefill={"ttft_ms": 500})
    out = desired_replicas(signals(0, 5.0, (3, 1)), p)
    assert out.prefill.replicas == 3
    assert "unreachable" in out.prefill.reason


def test_gpu_budget_cuts_where_least_goodput_is_lost():
    # Decode is the bottleneck: prefill replicas beyond what the decode pool can feed add no goodput.
    p = policy(prefill={"upscale_delay_s": 0, "min_replicas": 1}, decode={"upscale_delay_s": 0}, gpu_budget=6)
    out = desired_replicas(signals(0, 8.0, (6, 2)), p)
    assert out.gpus <= 6
    assert out.decode.replicas > 2 and out.prefill.replicas < 6
    assert "GPU budget" in out.prefill.reason


def test_two_gpu_types_cut_the_dearer_one_when_goodput_is_equal():
    p = policy(prefill={"accelerator_type": "H100", "min_replicas": 0}, decode={"accelerator_type": "L4", "min_replicas": 0},
               gpu_budget=3, gpu_cost_per_hour={"H100": 4.0, "L4": 0.8})
    out = desired_replicas(signals(0, 0.0, (2, 2), running=0), p)  # idle: every cut loses nothing
    assert out.replicas() == {"prefill": 1, "decode": 2}
    assert out.cost_per_hour == pytest.approx(4.0 + 2 * 0.8)


def test_replicas_outside_the_bounds_are_brought_back_at_once():
    p = policy(prefill={"min_replicas": 2})
    out = desired_replicas(signals(0, 0.1, (1, 12)), p)
    assert out.replicas() == {"prefill": 2, "decode": 10}


@pytest.mark.parametrize("data, field", [
    ({"prefill": {"min_replicas": 5, "max_replicas": 2}}, "prefill"),
    ({"decode": {"signals": ["tpot_ms"]}}, "decode"),
    ({"prefill": {"signals": ["running_seqs"]}}, "prefill.signals"),
    ({"gpu_budget": 1}, "gpu_budget"),
    ({"prefill": {"ttft": 300}}, "prefill.ttft"),
])
def test_invalid_policies_name_the_field(data, field):
    with pytest.raises(PolicyError, match=field):
        parse_policy(data, "policy.yaml")


def test_replicas_still_starting_do_not_inflate_the_latency_correction():
    p = policy()
    prof = p.decode.profile
    context = PROMPT + OUTPUT / 2
    on_one = prof.step_ms(12, int(12 * context))  # what the one serving replica runs at with all 12
    s = Signals(0, 6.0, 6 * PROMPT, 6 * OUTPUT, PoolSignals(1),
                PoolSignals(4, ready_replicas=1, running_seqs=12, measured_ms=on_one))
    assert desired_replicas(s, p).decode.correction == pytest.approx(1.0, abs=0.01)
