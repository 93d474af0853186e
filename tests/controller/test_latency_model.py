"""The online correction of a latency profile: one factor for the prediction's fixed part and one
for its per-token part, so that what short requests teach does not mispredict long ones."""

import math

from pdserve.config.routing import CPU_PROFILE
from pdserve.controller.latency_model import Correction, InstanceCorrection


def engine_prefill_ms(tokens: int) -> float:
    """An engine that prefills at 170 ms + 2.77 ms per token, about what `bench overload` calibrated
    on the 2-core machine (a chat 187 ms, a 1000-token prompt 2,943 ms), where the CPU profile says
    630 ms + 1.05 ms per token: fixed cost overestimated, per-token cost underestimated."""
    return 170.0 + 2.77 * tokens


def profile_parts(tokens: int) -> tuple[float, float]:
    return CPU_PROFILE.prefill_base_ms, CPU_PROFILE.prefill_ms_per_token * tokens


def test_with_one_part_alone_a_correction_is_the_weighted_mean_of_observed_over_predicted():
    c = Correction()
    c.observe(100, 0, 200)
    assert math.isclose(c.fixed, 2 ** c.alpha) and c.per_token == 1.0
    c.observe(0, 100, 50)
    assert math.isclose(c.per_token, 0.5 ** c.alpha) and math.isclose(c.fixed, 2 ** c.alpha)


def test_short_prompts_correct_the_fixed_cost_and_long_ones_the_per_token_cost():
    c = Correction()
    for i in range(200):  # one prompt in five is long
        tokens = 1000 if i % 5 == 4 else 50
        c.observe(*profile_parts(tokens), engine_prefill_ms(tokens))
    for tokens in (50, 1000, 4000):  # 4000: never seen, a straight line's extrapolation
        assert math.isclose(c.ms(*profile_parts(tokens)), engine_prefill_ms(tokens), rel_tol=0.05)
    assert c.fixed < 0.4 and c.per_token > 2.0


def test_what_chats_alone_teach_mispredicts_a_long_prompt_less_than_one_factor_for_both():
    c = Correction()
    for _ in range(100):
        c.observe(*profile_parts(50), engine_prefill_ms(50))
    assert math.isclose(c.ms(*profile_parts(50)), engine_prefill_ms(50), rel_tol=0.01)
    one_factor = engine_prefill_ms(50) / sum(profile_parts(50))
    one_factor_long_ms = one_factor * sum(profile_parts(1000))
    assert engine_prefill_ms(1000) / one_factor_long_ms > 3.5  # one factor: about 4x too fast
    assert engine_prefill_ms(1000) / c.ms(*profile_parts(1000)) < 2.5  # the chats said little of it


def test_a_correction_moves_gradually_and_stays_bounded():
    c = Correction()
    c.observe(100, 100, 400)
    assert 1.0 < c.ms(100, 100) / 200 < 1.2
    for _ in range(200):
        c.observe(100, 100, 100_000)
    assert math.isclose(c.fixed, c.limit) and math.isclose(c.per_token, c.limit)
    c.observe(0, 0, 50)  # nothing to learn from an empty prediction
    assert math.isclose(c.fixed, c.limit) and c.observations == 201


def test_evidence_of_slowness_fades_once_nothing_is_observed_and_evidence_of_speed_stays():
    c = Correction(fixed=4.0, per_token=0.25)
    c.decay_to(0.0)
    c.decay_to(c.fade_after_s)
    assert c.fixed == 4.0  # not observed for a while yet
    c.decay_to(c.fade_after_s + c.half_life_s)
    assert math.isclose(c.fixed, 2.0) and c.per_token == 0.25
    c.decay_to(c.fade_after_s + c.half_life_s)  # the same moment twice decays once
    assert math.isclose(c.fixed, 2.0)
    c.decay_to(10 * c.half_life_s)
    assert c.per_token == 0.25  # faster than the profile: no reason to become more pessimistic


def test_an_engine_measured_steadily_is_predicted_at_its_measured_pace_between_observations():
    """An engine twice as slow as its profile, observed every 10 s and looked at every second: the
    correction reaches 2x and stays there. Fading between observations held it near 1.4x."""
    c = Correction()
    for second in range(600):
        if second % 10 == 0:
            c.observe(*profile_parts(1000), 2.0 * sum(profile_parts(1000)))
        c.decay_to(float(second))
    assert math.isclose(c.ms(*profile_parts(1000)), 2.0 * sum(profile_parts(1000)), rel_tol=0.02)
    c.decay_to(590.0 + c.fade_after_s)  # nothing since the last one, at 590 s, for a while: still 2x
    assert math.isclose(c.ms(*profile_parts(1000)), 2.0 * sum(profile_parts(1000)), rel_tol=0.02)


def test_an_idle_instances_slowness_fades_toward_its_type_and_the_types_toward_the_profile():
    c = InstanceCorrection(Correction(fixed=1.5, per_token=0.5), Correction(fixed=3.0, per_token=3.0, observations=5))
    c.decay_to(0.0)
    c.decay_to(c.own.fade_after_s + c.own.half_life_s)
    assert math.isclose(c.current.fixed, (1.5 * 3.0) ** 0.5)  # half of each's slowness gone
    assert math.isclose(c.current.per_token, 0.5 * 3.0 ** 0.5)  # the type's speed kept, half the instance's slowness gone
