import math
from dataclasses import replace

from pdserve.config.routing import RoutingConfig
from pdserve.controller.decision import SLO, Outcome, RouteRequest
from pdserve.controller.slo_router import choose_slo, transfer_ms

from .routing_states import add, book, registry, request

CFG = RoutingConfig(local_prefill_max_tokens=0)
KV_BYTES = 1000


def route(reg, req, cfg=CFG, kv_bytes=KV_BYTES, best_effort=False, colocated=False, now_s=0.0):
    prefill = None if colocated else reg.view("prefill")
    decode = reg.view("colocated" if colocated else "decode")
    return choose_slo(req, prefill, decode, now_s - reg.ttl_s, cfg, kv_bytes, best_effort)


def test_picks_the_prefill_type_three_times_faster_when_both_are_idle():
    reg = registry()
    add(reg, "slow", "prefill")
    add(reg, "fast", "prefill", accelerator="FAST")
    add(reg, "d", "decode")
    d = route(reg, request(1000))
    assert d.outcome is Outcome.ROUTED and d.prefill.replica_id == "fast"
    # fast: 20 + 0.5 x 1000; the prefill instance samples the first token, so neither the transfer
    # (0.8 ms) nor the decode step (20 + 2 x 1 + 5 x 1.0) is in it
    assert math.isclose(d.predicted_ttft_ms, 520)
    assert "ttft 520/5000 ms, tpot 27/100 ms" in d.reason


def test_a_decision_names_each_targets_tensor_parallel_size_as_it_reported():
    reg = registry()
    add(reg, "p", "prefill", tp_size=4)
    add(reg, "d", "decode", tp_size=2)
    d = route(reg, request(1000))
    assert (d.prefill.tp_size, d.decode.tp_size) == (4, 2)  # the ingress tells each the other's


def test_a_queue_on_the_fast_type_sends_the_prompt_to_the_slow_one():
    reg = registry()
    add(reg, "slow", "prefill")
    add(reg, "fast", "prefill", accelerator="FAST", queued_prefill_tokens=4000)  # 20 + 0.5 x 5000 = 2520 ms
    add(reg, "d", "decode")
    d = route(reg, request(1000))
    assert d.prefill.replica_id == "slow"  # 60 + 1.5 x 1000 = 1560 ms
    assert math.isclose(d.predicted_ttft_ms, 1560)


def test_prompts_routed_by_the_controller_queue_on_their_prefill_instance():
    reg = registry()
    add(reg, "slow", "prefill")
    add(reg, "fast", "prefill", accelerator="FAST")
    add(reg, "d", "decode")
    chosen = []
    for i in range(4):
        req = RouteRequest(f"r{i}", 1000, 50, SLO(5000, 100))
        d = route(reg, req)
        reg.assign(req, d, 0.0)
        chosen.append(d.prefill.replica_id)
    # fast's queue grows by 500 ms a prompt; slow (1560 ms) wins once fast's reaches it.
    assert chosen == ["fast", "fast", "fast", "slow"]


def test_a_decode_step_that_would_break_a_running_requests_tpot_excludes_the_instance():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "tight", "decode")
    add(reg, "loose", "decode")
    book(reg, "running-tight", 2000, decode="tight", tpot_ms=30)  # next step there: 20 + 2x2 + 5x3 = 39 ms
    book(reg, "running-loose1", 2000, decode="loose", tpot_ms=500)
    book(reg, "running-loose2", 2000, decode="loose", tpot_ms=500)
    d = route(reg, request(1000, tpot_ms=100))
    assert d.outcome is Outcome.ROUTED and d.decode.replica_id == "loose"
    alone = registry()
    add(alone, "p", "prefill", accelerator="FAST")
    add(alone, "tight", "decode")
    book(alone, "running-tight", 2000, decode="tight", tpot_ms=30)
    refused = route(alone, request(1000, tpot_ms=100))
    assert refused.outcome is Outcome.REJECTED and "best tpot 39/100 ms" in refused.reason


def test_a_tpot_objective_tighter_than_any_step_is_rejected_at_once():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode")
    d = route(reg, request(100, tpot_ms=10))  # the idle step alone is 22.5 ms
    assert d.outcome is Outcome.REJECTED and d.retry_after_s >= 1


def test_decode_instances_without_kv_room_are_skipped_and_none_left_is_overloaded():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "small", "decode", free_kv_blocks=10)  # 160 tokens
    add(reg, "big", "decode", free_kv_blocks=100)
    d = route(reg, request(1000))  # needs 1000 + 50 tokens of room: only big has it
    assert d.outcome is Outcome.ROUTED and d.decode.replica_id == "big"
    d = route(reg, request(1600))
    assert d.outcome is Outcome.OVERLOADED and "KV room for 1650 tokens (most free: 1600)" in d.reason


def test_a_prompt_predicted_to_miss_its_ttft_is_rejected_with_a_retry_hint_or_served_best_effort():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST", queued_prefill_tokens=6000)  # 20 + 0.5 x 7000 = 3520 ms
    add(reg, "d", "decode")
    d = route(reg, request(1000, ttft_ms=1000))
    assert d.outcome is Outcome.REJECTED
    assert "best ttft 3520/1000 ms" in d.reason
    assert 2.5 <= d.retry_after_s <= 2.6
    served = route(reg, request(1000, ttft_ms=1000), best_effort=True)
    assert served.outcome is Outcome.ROUTED and served.reason.startswith("best effort")


def test_best_effort_holds_a_request_past_its_tpot_while_its_ttft_allows_but_not_one_already_past_its_ttft():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode", max_ongoing=32)
    for i in range(10):
        book(reg, f"running-{i}", 100, decode="d")
    view = reg.view("prefill"), reg.view("decode")
    # A step of 11 sequences is predicted at 52 ms, past a 40-ms TPOT; its prompt's first token at 520 ms.
    held = choose_slo(request(1000, ttft_ms=5000, tpot_ms=40), *view, -reg.ttl_s, CFG, KV_BYTES, True, hold=True)
    assert held.outcome is Outcome.HELD and held.retry_after_s == 0.2
    assert held.reason.startswith("held (0 ms so far, 5000 ms of its ttft objective left), served now: best effort")
    late = choose_slo(request(1000, ttft_ms=600, tpot_ms=40), *view, -reg.ttl_s, CFG, KV_BYTES, True, hold=True)
    assert late.outcome is Outcome.ROUTED and late.reason.startswith("best effort, objectives not met")
    # Holding is for best effort only: otherwise it is refused at once.
    assert choose_slo(request(1000, ttft_ms=5000, tpot_ms=40), *view, -reg.ttl_s, CFG, KV_BYTES,
                      hold=True).outcome is Outcome.REJECTED


def test_best_effort_holds_a_request_past_its_ttft_on_while_its_step_would_push_the_running_requests_past_theirs():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode", max_ongoing=32)
    for i in range(10):
        book(reg, f"running-{i}", 100, decode="d", tpot_ms=50)
    view = reg.view("prefill"), reg.view("decode")

    def ask(held_ms, cfg=CFG):
        req = replace(request(1000, ttft_ms=600, tpot_ms=60), held_ms=held_ms)
        return choose_slo(req, *view, -reg.ttl_s, cfg, KV_BYTES, True, hold=True)

    # Its first token at 520 ms leaves no recheck in a 600-ms objective, but its step (52 ms) would take
    # the ten running requests past their 50 ms: held up to late_hold_max_s (30 s) past the objective.
    assert ask(0.0).reason.startswith("held past its ttft objective (0 ms so far, 30600 ms of its late hold left)")
    assert ask(29879.0).outcome is Outcome.HELD
    assert ask(29881.0).outcome is Outcome.ROUTED
    assert ask(0.0, CFG.model_copy(update={"late_hold_max_s": 0})).outcome is Outcome.ROUTED


def test_time_held_at_the_ingress_is_spent_out_of_the_ttft_objective():
    reg = registry()
    add(reg, "p1", "prefill")
    add(reg, "d1", "decode")
    fresh = route(reg, request(1000, ttft_ms=5000))
    assert fresh.outcome is Outcome.ROUTED
    left_ms = 5000 - fresh.predicted_ttft_ms
    assert route(reg, replace(request(1000, ttft_ms=5000), held_ms=left_ms - 1)).outcome is Outcome.ROUTED
    late = route(reg, replace(request(1000, ttft_ms=5000), held_ms=left_ms + 1))
    assert late.outcome is Outcome.REJECTED and f"/{fresh.predicted_ttft_ms - 1:.0f} ms" in late.reason


def test_lower_priorities_are_rejected_first():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode")
    # predicted ttft 520 ms against 600 ms: priority 0 has room, priority 2 needs 20% margin
    assert route(reg, request(1000, ttft_ms=600, priority=0)).outcome is Outcome.ROUTED
    low = route(reg, request(1000, ttft_ms=600, priority=2))
    assert low.outcome is Outcome.REJECTED and "priority 2" in low.reason and "/480 ms" in low.reason


def test_a_short_prompt_is_prefilled_on_the_decode_instance_when_that_beats_the_transfer():
    cfg = RoutingConfig(local_prefill_max_tokens=64, intra_node_kv_gbps=1, inter_node_kv_gbps=1)
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode", accelerator="FAST")
    kv_bytes = 100_000  # 20 tokens: 16 ms on the wire
    short = route(reg, request(20), cfg, kv_bytes)
    assert short.outcome is Outcome.ROUTED and short.prefill is None and "local prefill" in short.reason
    long = route(reg, request(200), cfg, kv_bytes)
    assert long.prefill is not None and long.prefill.replica_id == "p"
    never = route(reg, request(20), cfg.model_copy(update={"local_prefill_max_tokens": 0}), kv_bytes)
    assert never.prefill is not None


def test_a_decode_instance_whose_local_prefills_were_seen_while_its_type_was_slow_follows_the_type_since():
    """Its three local prefills ran as the profile predicts; then the prefill instance of the same type
    shows the type at 0.3x. The decode instance's local prefill is predicted at 0.3x too, so a short
    prompt stays where it decodes (learned apart, the decode instance kept the profile's time and
    every short prompt moved its KV)."""
    cfg = RoutingConfig(local_prefill_max_tokens=64)
    reg = registry()
    add(reg, "p", "prefill")
    add(reg, "d", "decode")
    for i in range(3):
        book(reg, f"local{i}", 20, decode="d")  # observed as predicted
        reg.release(f"local{i}")
    for i in range(20):
        book(reg, f"r{i}", 100, prefill="p", decode="d")
        reg.prefill_done(f"r{i}", 0.3 * reg.instances["p"].profile.prefill_ms(100, 0), now_s=0.0)
        reg.release(f"r{i}")
    decode, prefill = reg.view("decode"), reg.view("prefill")
    local_ms, remote_ms = (v.prefill_base_ms[0] + 16 * v.prefill_ms_per_token[0] for v in (decode, prefill))
    assert math.isclose(local_ms, remote_ms, rel_tol=0.05)
    short = route(reg, request(16), cfg)
    assert short.outcome is Outcome.ROUTED and short.prefill is None and "local prefill" in short.reason


def test_a_short_prompt_stays_where_it_decodes_unless_the_prefill_instance_is_sooner_by_more_than_a_transfers_setup():
    reg = registry()
    add(reg, "p", "prefill")
    add(reg, "d", "decode")
    own = reg.instances["p"].prefill_fix.own  # the prefill instance is seen 10% faster than its type
    own.fixed, own.per_token, own.observations = 0.9, 0.9, 5
    add(reg, "p", "prefill")  # its next report
    cfg = RoutingConfig(local_prefill_max_tokens=64)  # its 16-token prefill 8.4 ms sooner, the setup 15 ms
    here = route(reg, request(16), cfg)
    # Both ways logged: 84 ms prefill and a 22 ms step; 75.6 + 15 ms setup + the bytes, and the step.
    assert here.prefill is None and "second token at 106 ms prefilled here, 113 ms with the KV moved" in here.reason
    assert route(reg, request(16), cfg.model_copy(update={"kv_transfer_setup_ms": 0})).prefill.replica_id == "p"
    own.fixed, own.per_token = 0.7, 0.7
    add(reg, "p", "prefill")  # 25 ms sooner: worth the move
    assert route(reg, request(16), cfg).prefill.replica_id == "p"


def test_local_prefill_is_refused_where_its_stall_would_break_a_running_requests_tpot():
    cfg = RoutingConfig(local_prefill_max_tokens=64, intra_node_kv_gbps=1, inter_node_kv_gbps=1)
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode", accelerator="FAST")
    book(reg, "running", 10, decode="d", tpot_ms=25)  # prefilling 20 tokens here stalls it 30 ms
    d = route(reg, request(20), cfg, 100_000)
    assert d.outcome is Outcome.ROUTED and d.prefill is not None and d.prefill.replica_id == "p"


def test_a_short_prompt_still_goes_to_a_prefill_instance_that_is_faster():
    cfg = RoutingConfig(local_prefill_max_tokens=64)
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode")  # the slow type: prefilling here costs 60 + 1.5 x 20 ms
    d = route(reg, request(20), cfg)
    assert d.prefill is not None and d.prefill.replica_id == "p"


def test_slow_links_between_nodes_favour_a_prefill_instance_on_the_decode_node():
    slow_net = RoutingConfig(local_prefill_max_tokens=0, intra_node_kv_gbps=100, inter_node_kv_gbps=1)
    reg = registry()
    add(reg, "far", "prefill", node="n2", accelerator="FAST")  # 270 ms + 400 ms over the network
    add(reg, "near", "prefill", node="n1", accelerator="FAST", queued_prefill_tokens=200)  # 370 + 4 ms
    add(reg, "d", "decode", node="n1")
    kv_bytes = 100_000
    assert transfer_ms(500, kv_bytes, 1) == 400
    assert route(reg, request(500), slow_net, kv_bytes).prefill.replica_id == "near"
    same_net = RoutingConfig(local_prefill_max_tokens=0)
    assert route(reg, request(500), same_net, kv_bytes).prefill.replica_id == "far"


def test_each_decode_node_pairs_with_its_own_prefill_instance():
    slow_net = RoutingConfig(local_prefill_max_tokens=0, intra_node_kv_gbps=100, inter_node_kv_gbps=1)
    reg = registry()
    add(reg, "p1", "prefill", node="n1", accelerator="FAST", queued_prefill_tokens=100)
    add(reg, "p2", "prefill", node="n2", accelerator="FAST")
    add(reg, "d1", "decode", node="n1")
    book(reg, "busy", 500, decode="d1")
    add(reg, "d2", "decode", node="n2")
    d = route(reg, request(500), slow_net, 100_000)
    assert (d.prefill.replica_id, d.decode.replica_id) == ("p2", "d2")


def test_colocated_instances_prefill_locally_and_the_least_busy_wins():
    reg = registry()
    add(reg, "c1", "colocated", queued_prefill_tokens=500)
    add(reg, "c2", "colocated")
    d = route(reg, request(100), colocated=True)
    assert d.outcome is Outcome.ROUTED and d.prefill is None and d.decode.replica_id == "c2"


def test_silent_and_full_instances_are_out_and_an_empty_pool_is_unavailable():
    reg = registry()
    add(reg, "p", "prefill", now_s=0.0)
    add(reg, "d", "decode", now_s=10.0)
    assert route(reg, request(10), now_s=10.0).outcome is Outcome.UNAVAILABLE  # p silent for 10 s
    add(reg, "p", "prefill", now_s=10.0)
    assert route(reg, request(10), now_s=10.0).outcome is Outcome.ROUTED
    full = registry()
    add(full, "p", "prefill")
    add(full, "d", "decode", max_ongoing=1)
    book(full, "x", 10, decode="d")
    assert route(full, request(10)).outcome is Outcome.OVERLOADED
    assert route(registry(), request(10)).outcome is Outcome.UNAVAILABLE
