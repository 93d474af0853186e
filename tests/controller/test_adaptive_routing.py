"""Adaptive mode: one pool whose instances each prefill and decode (chunked prefill), the SLO
router choosing per request where its prompt is prefilled and where it decodes."""

import math
from dataclasses import replace

from pdserve.config.routing import RoutingConfig
from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest, Target
from pdserve.controller.slo_router import choose_slo

from .routing_states import add, book, registry, request

CHUNK = 64
KV_BYTES = 1000
CFG = RoutingConfig()


def route(reg, req, cfg=CFG, kv_bytes=KV_BYTES):
    view = reg.view("adaptive")
    return choose_slo(req, view, view, -reg.ttl_s, cfg, kv_bytes)


def engine(reg, rid, **kw):
    add(reg, rid, "adaptive", prefill_chunk_tokens=CHUNK, **kw)


def test_on_an_idle_pool_a_long_prompt_is_prefilled_where_it_decodes():
    reg = registry()
    engine(reg, "a")
    engine(reg, "b")
    d = route(reg, request(1000))
    assert d.outcome is Outcome.ROUTED and d.prefill is None and d.decode.replica_id == "a"
    # 60 + 1.5 x 1000 (nothing decoding there: the chunks alone; the last one samples the first token)
    assert math.isclose(d.predicted_ttft_ms, 1560) and "local prefill" in d.reason


def test_on_an_idle_pool_a_short_prompt_stays_whole_on_one_instance_even_where_another_prefills_faster():
    reg = registry()
    engine(reg, "a")
    engine(reg, "b", accelerator="FAST")
    d = route(reg, request(16))
    # a could decode it after b's faster prefill, but b alone gives the first token as soon, moving no KV
    assert d.prefill is None and d.decode.replica_id == "b" and "local prefill" in d.reason


def test_an_instance_whose_decodes_a_chunk_would_push_past_their_tpot_gets_its_prompt_prefilled_elsewhere():
    reg = registry()
    engine(reg, "a")
    engine(reg, "b")
    book(reg, "running", 100, decode="a", tpot_ms=50)  # a's step 24.5 ms + a 64-token chunk 60 + 96 ms > 50
    d = route(reg, request(1000))
    # b prefills (1560 ms, first token sampled there) and the answer decodes on a, whose step
    # with it (29.5 ms) keeps the running request within 50 ms: the pool splits into roles (b
    # alone would give the first token as soon; a already decodes).
    assert d.prefill.replica_id == "b" and d.decode.replica_id == "a"
    assert math.isclose(d.predicted_ttft_ms, 1560)


def test_on_a_tie_an_answer_stays_whole_on_an_idle_instance_rather_than_moving_where_prompts_are_queued():
    reg = registry()
    engine(reg, "a")
    engine(reg, "b")
    book(reg, "running", 100, decode="a", tpot_ms=1000, max_tokens=200)
    book(reg, "queued", 1000, prefill="a")  # a decodes and prefills: its steps carry chunks for a while
    assert list(reg.view("adaptive").queued_stall_ms) == [2460.0, 0.0]  # 16 chunks x 60 ms + 1000 x 1.5 ms
    d = route(reg, request(1000, ttft_ms=10_000, tpot_ms=1000))
    # b gives the first token in 1560 ms either way; moved to a, the answer would wait there for a's queue
    assert d.prefill is None and d.decode.replica_id == "b" and math.isclose(d.predicted_ttft_ms, 1560)


def test_an_answer_that_would_take_no_prompt_like_its_own_leaves_the_last_instance_free_of_answers_free():
    placed = {}
    for tpot_ms, max_tokens in ((100, 10), (1000, 200)):
        reg = registry()
        engine(reg, "a")
        engine(reg, "b")
        book(reg, "running", 100, decode="a", tpot_ms=1000, max_tokens=200)
        book(reg, "queued", 600, prefill="a")  # drained (1500 ms) before a KV prefilled on b could land
        d = route(reg, request(1000, ttft_ms=10_000, tpot_ms=tpot_ms, max_tokens=max_tokens))
        assert math.isclose(d.predicted_ttft_ms, 1560)  # b prefills it either way
        placed[tpot_ms] = d.prefill.replica_id if d.prefill else None, d.decode.replica_id
    # On b its 10-token answer would have (100 - 27) x 9 = 657 ms of room, and a prompt like its own
    # stalls it 16 x 60 + 1500 = 2460 ms: b would take no such prompt while it decodes, so it decodes on
    # a. A long answer with a loose TPOT takes such prompts: it stays whole on b, its KV not moved.
    assert placed == {100: ("b", "a"), 1000: (None, "b")}


def test_an_answer_moves_onto_an_instance_with_prompts_queued_only_if_its_tpot_absorbs_the_wait_behind_them():
    placed = {}
    for queued_tokens, max_tokens in ((1000, 200), (1000, 10), (600, 10)):
        reg = registry()
        engine(reg, "a")
        engine(reg, "b")
        book(reg, "running", 100, decode="a", tpot_ms=1000, max_tokens=200)
        book(reg, "queued", queued_tokens, prefill="a")  # a's queue drains in 2460 ms (1000 tokens), 1500 ms (600)
        # Prefilled on b, the answer's KV reaches a at 1560.8 ms and waits there for the 1000-token queue,
        # 899.2 ms (the 600-token one is done). With the answer a's step is 29.5 ms: over 199 steps it has
        # (100 - 29.5) x 199 = 14030 ms of room for the wait; over 9, 634.5 ms.
        d = route(reg, request(1000, ttft_ms=10_000, tpot_ms=100, max_tokens=max_tokens),
                  RoutingConfig(local_prefill_max_tokens=0))  # every prompt prefilled on the other instance
        placed[queued_tokens, max_tokens] = d.prefill.replica_id, d.decode.replica_id
    # the short answer waits for a's long queue instead, its prompt prefilled behind it
    assert placed == {(1000, 200): ("b", "a"), (1000, 10): ("a", "b"), (600, 10): ("b", "a")}


def test_loose_objectives_let_an_instance_prefill_while_it_decodes():
    reg = registry()
    engine(reg, "a")
    book(reg, "running", 100, decode="a", tpot_ms=1000)  # 24.5 + 60 + 96 ms per step: within 1000 ms
    d = route(reg, request(1000, ttft_ms=10_000))
    assert d.outcome is Outcome.ROUTED and d.prefill is None and d.decode.replica_id == "a"
    # 60 + 1500 + 16 chunk steps of a's batch (24.5 ms each), then the first step with it (29.5 ms)
    assert math.isclose(d.predicted_ttft_ms, 60 + 1500 + 16 * 24.5 + 29.5)


def test_an_answer_long_enough_to_absorb_a_prompts_chunks_within_its_tpot_lets_its_instance_prefill_it():
    outcomes = {}
    for amortize_tokens in (256, 0):  # 0: every step within the objective (the rule before amortizing)
        reg = registry()
        reg.tpot_amortize_max_tokens = amortize_tokens
        engine(reg, "a")
        engine(reg, "b")
        # Each step with a 64-token chunk, 24.5 + 60 + 96 ms, is past 150 ms on both. The whole prompt
        # stalls the answers decoding there by 16 x 60 + 1500 = 2460 ms: a's answer spreads that over
        # 199 steps, (150 - 24.5) x 199 = 24974 ms of room; b's over 9, 1129 ms.
        book(reg, "long", 100, decode="a", tpot_ms=150, max_tokens=200)
        book(reg, "short", 100, decode="b", tpot_ms=150, max_tokens=10)
        d = route(reg, request(1000, ttft_ms=10_000, tpot_ms=5000))
        outcomes[amortize_tokens] = d.outcome, (d.prefill or d.decode).replica_id if d.decode else None
        if d.outcome is Outcome.ROUTED:  # the log says what the answers there absorb
            assert d.reason.endswith("its chunks stall the answers decoding there 2460 ms, room 24974 ms, "
                                     "16 chunks where they take 160")  # 156 ms each
    assert outcomes == {256: (Outcome.ROUTED, "a"), 0: (Outcome.REJECTED, None)}  # prefilled on a


def test_the_stall_booked_next_to_an_answer_uses_up_what_it_can_absorb():
    reg = registry()
    engine(reg, "a")
    book(reg, "running", 100, decode="a", tpot_ms=150, max_tokens=30)  # (150 - 24.5) x 29 = 3640 ms of room
    first = request(1000, ttft_ms=10_000, tpot_ms=5000)
    d = route(reg, first)
    assert d.outcome is Outcome.ROUTED and d.prefill is None and d.decode.replica_id == "a"  # 2460 ms: within
    reg.assign(first, d, now_s=0.0)
    assert reg.instances["a"].assignments["running"].absorbed_ms == 2460.0
    assert reg.instances["a"].assignments["r"].absorbed_ms == 0.0  # its own prefill does not slow its answer
    second = RouteRequest("r2", 1000, 50, first.slo)
    assert route(reg, second).outcome is Outcome.REJECTED  # under 1180 ms of room left: not another 2460


def test_an_answer_takes_only_the_chunks_its_steps_left_carry_so_a_prompt_refused_at_its_start_fits_later():
    booked = {}
    for now_s in (0.0, 1.5, 2.0):
        reg = registry()
        engine(reg, "a")
        book(reg, "running", 100, decode="a", tpot_ms=150, max_tokens=30)  # 3640 ms of room, first token at 0 s
        first = request(1000, ttft_ms=10_000, tpot_ms=5000)
        reg.assign(first, route(reg, first), now_s=0.0)  # its 16 chunks ride 16 of the answer's 29 steps: 2460 ms
        engine(reg, "a", now_s=now_s)  # a reports: the answer has made at least now_s / 150 ms tokens
        second = RouteRequest("r2", 1000, 50, first.slo)
        d = route(reg, second)
        if d.outcome is Outcome.ROUTED:
            reg.assign(second, d, now_s=now_s)
        booked[now_s] = d.outcome, reg.instances["a"].assignments["running"].absorbed_ms
    # At 0 s the second prompt's chunks would ride 13 steps (156 ms each), past the 1180 ms left; at
    # 1.5 s 10 tokens are made, 3 steps are left past the first prompt's chunks (468 ms); at 2 s none.
    assert booked == {0.0: (Outcome.REJECTED, 2460.0), 1.5: (Outcome.ROUTED, 2460.0 + 3 * 156.0),
                      2.0: (Outcome.ROUTED, 2460.0)}


def test_a_prompt_prefilled_before_a_moved_answer_lands_there_does_not_count_against_that_answer():
    """An answer whose prompt waits in another instance's queue decodes nowhere yet: the chunks an
    instance prefills before it lands do not slow it (seen: an engine holding only such answers
    refused every prompt, while the other engine's queue grew to 20 s)."""
    placed = {}
    for lands_in_ms in (10_000.0, 1_000.0):
        reg = registry()
        engine(reg, "a")
        engine(reg, "b")
        a, b = (Target(rid, reg.instances[rid].report.kv_addr, 0, "adaptive") for rid in ("a", "b"))
        # Prefilled on b, decoding on a from its first token: 9 steps with room for 7 chunks of 156 ms.
        moved = RouteRequest("moved", 1000, 10, SLO(ttft_ms=1e6, tpot_ms=150))
        reg.assign(moved, Decision(Outcome.ROUTED, b, a, predicted_ttft_ms=lands_in_ms), now_s=0.0)
        new = request(1000, ttft_ms=10_000, tpot_ms=5000)  # 16 chunks of 156 ms: 2.5 s
        d = route(reg, new)
        reg.assign(new, d, now_s=0.0)
        placed[lands_in_ms] = (d.prefill or d.decode).replica_id, reg.instances["a"].assignments["moved"].absorbed_ms
    # Landing in 10 s, the prompt is prefilled on a long before: at once, nothing booked on the answer.
    # Landing in 1 s, 6 of its chunks come first and 10 would ride 9 steps: too many; b prefills it.
    assert placed == {10_000.0: ("a", 0.0), 1_000.0: ("b", 0.0)}


def test_a_prompt_no_instance_can_prefill_within_its_neighbours_tpot_is_refused_naming_the_pool():
    reg = registry()
    engine(reg, "a")
    engine(reg, "b")
    book(reg, "ra", 100, decode="a", tpot_ms=100)
    book(reg, "rb", 100, decode="b", tpot_ms=100)
    # A 64-token chunk stalls a step by a prefill of 64 tokens, 60 + 96 ms: with the step's 24.5, past 100.
    d = route(reg, request(1000, tpot_ms=200))
    assert d.outcome is Outcome.REJECTED and "no adaptive pair" in d.reason
    short = route(reg, request(10, tpot_ms=200))  # 60 + 15 ms: within 100
    assert short.outcome is Outcome.ROUTED and short.prefill is None


def answers_tight_on_both():
    """a and b (3x faster prefills) each decoding an answer that no 1000-token prompt's chunks spare."""
    reg = registry()
    engine(reg, "a")
    engine(reg, "b", accelerator="FAST")
    book(reg, "ra", 100, decode="a", tpot_ms=50)
    book(reg, "rb", 100, decode="b", tpot_ms=50)
    return reg, reg.view("adaptive")


def test_best_effort_serves_a_prompt_no_instance_can_prefill_sparing_its_neighbours_where_it_is_soonest():
    reg, view = answers_tight_on_both()
    d = choose_slo(request(1000), view, view, -reg.ttl_s, CFG, KV_BYTES, best_effort=True)
    # b prefills 3x faster: 20 + 500 ms and 16 chunk steps of its batch (24.5 ms each)
    assert d.outcome is Outcome.ROUTED and d.prefill.replica_id == "b" and d.decode.replica_id == "a"
    assert math.isclose(d.predicted_ttft_ms, 520 + 16 * 24.5)
    assert d.reason.startswith("best effort, decoding answers not spared: prefill b")


def test_best_effort_holds_a_prompt_no_instance_can_prefill_sparing_its_neighbours_while_its_ttft_allows():
    reg, view = answers_tight_on_both()

    def ask(held_ms, cfg=CFG, lifetime_s=600.0):
        req = replace(request(1000, ttft_ms=5000), held_ms=held_ms, lifetime_s=lifetime_s)
        return choose_slo(req, view, view, -reg.ttl_s, cfg, KV_BYTES, best_effort=True, hold=True)

    # Served next to the answers its first token would come in 912 ms: 5000 - 912 - 200 ms of the
    # objective can go to waiting for an instance to spare them, one 200-ms recheck at a time.
    d = ask(0.0)
    assert d.outcome is Outcome.HELD and d.retry_after_s == 0.2 and math.isclose(d.predicted_ttft_ms, 912)
    assert ask(3887.0).outcome is Outcome.HELD
    # Past its objective, it would still slow the answers beside its chunks: held on, late_hold_max_s at most.
    late = ask(3889.0)
    assert late.outcome is Outcome.HELD and late.reason.startswith(
        "held past its ttft objective (3889 ms so far, 31111 ms of its late hold left), as it would slow")
    assert ask(33887.0).outcome is Outcome.HELD
    served = ask(33889.0)
    assert served.outcome is Outcome.ROUTED and served.prefill.replica_id == "b" and served.decode.replica_id == "a"
    assert served.reason.startswith("held 33889 ms, best effort, objectives not met, decoding answers not spared: prefill b")
    assert ask(3889.0, cfg=RoutingConfig(late_hold_max_s=0)).outcome is Outcome.ROUTED
    # Not past its deadline, nor past the time its answer needs before it, and never with holding off.
    assert ask(0.0, lifetime_s=1.0).outcome is Outcome.ROUTED
    answer_s = served.predicted_tpot_ms * 50 / 1000
    assert ask(3889.0, lifetime_s=answer_s + 4.0).outcome is Outcome.HELD
    assert ask(3889.0, lifetime_s=answer_s + 1.0).outcome is Outcome.ROUTED
    assert ask(0.0, cfg=RoutingConfig(hold_recheck_ms=0)).outcome is Outcome.ROUTED


def test_best_effort_serves_a_prompt_past_its_ttft_objective_at_once_where_it_spares_the_answers_decoding():
    reg = registry()
    engine(reg, "a")
    engine(reg, "b")
    book(reg, "ra", 100, decode="a", tpot_ms=50)  # a cannot prefill it sparing its answer; b can
    view = reg.view("adaptive")
    # Its first token, prefilled on idle b, comes at 1560 ms, past what is left of its TTFT objective.
    d = choose_slo(replace(request(1000, ttft_ms=5000), held_ms=4000.0), view, view, -reg.ttl_s, CFG, KV_BYTES,
                   best_effort=True, hold=True)
    assert d.outcome is Outcome.ROUTED and d.reason.startswith("held 4000 ms, best effort, objectives not met: ")


def test_best_effort_does_not_move_an_answer_behind_a_queue_its_tpot_cannot_absorb():
    reg = registry()
    engine(reg, "a")
    engine(reg, "b")
    # Neither can prefill sparing its answer: a chunk makes a step 180.5 ms, and b's answer, with room
    # for (50 - 24.5) x 199 = 5074.5 ms of stall, has the queued prompt's 4920 ms booked on it.
    book(reg, "ra", 100, decode="a", tpot_ms=50)
    book(reg, "rb", 100, decode="b", tpot_ms=50, max_tokens=200)
    book(reg, "queued", 2000, prefill="b")  # b's queue drains in 4920 ms
    view = reg.view("adaptive")
    d = choose_slo(request(1000, max_tokens=10), view, view, -reg.ttl_s, CFG, KV_BYTES, best_effort=True)
    # Prefilled on a, the first token comes at 1952 ms, sooner than a's own answer-first local prefill
    # (1981.5 ms); moved to b, the 10-token answer would wait about 2968 ms for b's queue, past its
    # (100 - 29.5) x 9 = 634.5 ms of room. So it stays whole on a.
    assert d.outcome is Outcome.ROUTED and d.prefill is None and d.decode.replica_id == "a"
    assert d.reason.startswith("best effort, decoding answers not spared: local prefill")


def test_an_instance_is_never_paired_with_itself():
    reg = registry()
    engine(reg, "a")
    d = route(reg, request(1000), RoutingConfig(local_prefill_max_tokens=0))  # local prefill ruled out
    assert d.outcome is Outcome.REJECTED and math.isinf(d.predicted_ttft_ms)


def test_a_slow_network_between_nodes_keeps_the_prefill_on_the_decoding_instances_node():
    kv_bytes = 200_000  # 1000 tokens: 16 ms within a node at 100 Gb/s, 1.6 s across at 1 Gb/s
    slow_net = RoutingConfig(intra_node_kv_gbps=100, inter_node_kv_gbps=1)
    picks = {}
    for name, cfg in (("slow", slow_net), ("uniform", RoutingConfig())):
        reg = registry()
        engine(reg, "a", node="n1")
        engine(reg, "b", node="n1")
        # c prefills 1000 tokens in 520 ms (b in 1560) and has no KV room to decode them itself
        engine(reg, "c", node="n2", accelerator="FAST", free_kv_blocks=1)
        book(reg, "running", 100, decode="a", tpot_ms=50)
        d = route(reg, request(1000), cfg, kv_bytes)
        picks[name] = (d.prefill.replica_id, d.decode.replica_id)
    assert picks == {"slow": ("b", "a"), "uniform": ("c", "a")}


def test_engines_of_several_adaptive_pools_are_routed_as_one_each_by_its_types_profile_and_called_in_its_pool():
    reg = registry()
    engine(reg, "a")
    add(reg, "b", "adaptive-fast", accelerator="FAST", prefill_chunk_tokens=CHUNK)
    assert reg.view("adaptive").replica_ids == ["a", "b"] and reg.placement("b") == ("adaptive", 1)
    book(reg, "running", 100, decode="a", tpot_ms=50)  # a chunk prefilled on a would push it past 50 ms
    d = route(reg, request(1000))
    assert (d.prefill.replica_id, d.prefill.pool, d.decode.replica_id, d.decode.pool) == (
        "b", "adaptive-fast", "a", "adaptive")
    assert math.isclose(d.predicted_ttft_ms, 20 + 0.5 * 1000)  # FAST's prefill, not the default's 1560 ms
