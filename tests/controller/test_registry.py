import math

from pdserve.controller.decision import SLO, Decision, Outcome, RouteRequest, Target
from pdserve.controller.instance import LoadReport

from .routing_states import FAST, add, book, registry


def _report(rid="d1", pool="decode", running=0, started=1.0, free_kv_blocks=100, **kw) -> LoadReport:
    return LoadReport(rid, pool, "n", None, "a:1", 8, started, running=running, free_kv_blocks=free_kv_blocks,
                      block_size=16, **kw)


def test_drops_silent_instances_and_takes_them_back():
    reg = registry()
    reg.report(_report(), now_s=0.0)
    assert [i.replica_id for i in reg.live("decode", 2.0)] == ["d1"]
    assert reg.live("decode", 5.0) == []
    reg.report(_report(), now_s=6.0)
    assert [i.replica_id for i in reg.live("decode", 6.5)] == ["d1"]
    assert reg.view("decode").last_seen_s[0] == 6.0


def test_a_route_books_the_prompt_on_its_prefill_instance_until_prefilled_and_the_sequence_until_released():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode")
    book(reg, "r1", 400, prefill="p", decode="d")
    p, d = reg.instances["p"], reg.instances["d"]
    assert (p.load, p.queued_prefill_tokens(), d.load) == (1, 400, 1)
    assert reg.view("prefill").prefill_base_ms[0] == FAST.prefill_ms(0, 400)
    assert d.assignments["r1"].decoding_since_s is None
    reg.prefill_done("r1", prefill_ms=FAST.prefill_ms(400, 0), now_s=2.5)
    assert (p.load, p.queued_prefill_tokens(), d.load) == (0, 0, 1)
    assert d.assignments["r1"].decoding_since_s == 2.5  # the first token came: its answer decodes from then
    reg.release("r1", tpot_ms=None)
    assert d.load == 0 and reg.view("decode").load[0] == 0
    reg.release("r1")  # a second release of the same request changes nothing
    assert d.load == 0


def test_what_an_instance_reports_at_first_sight_counts_until_it_finishes():
    reg = registry()
    reg.report(_report(running=3, queued_prefill_tokens=90), 0.0)  # e.g. after a controller restart
    inst = reg.instances["d1"]
    assert inst.load == 3 and inst.queued_prefill_tokens() == 90
    reg.report(_report(running=1, queued_prefill_tokens=0), 0.5)
    assert inst.load == 1 and inst.queued_prefill_tokens() == 0
    reg.report(_report(running=5), 1.0)  # new work it reports is work the ledger routed, never unknown
    assert inst.load == 1


def test_a_late_report_does_not_hide_a_release_and_a_restart_clears_the_ledger():
    reg = registry()
    reg.report(_report(), 0.0)
    book(reg, "a", 10, decode="d1")
    book(reg, "b", 10, decode="d1")
    reg.report(_report(running=2), 0.1)
    reg.release("a")
    reg.release("b")
    assert reg.instances["d1"].load == 0
    book(reg, "c", 10, decode="d1")
    reg.report(_report(running=0, started=2.0), 0.2)  # a new incarnation of the replica
    assert reg.instances["d1"].load == 0 and len(reg.view("decode")) == 1


def test_kv_room_counts_requests_routed_since_the_last_report():
    reg = registry()
    reg.report(_report(), 0.0)  # 100 blocks x 16 tokens
    req = RouteRequest("r", 300, 20, SLO(1e3, 1e3))
    reg.assign(req, Decision(Outcome.ROUTED, None, Target("d1", "a:1", 0, "decode")), now_s=0.1)
    assert reg.view("decode").free_kv_tokens[0] == 1600 - 320
    reg.report(_report(running=1, free_kv_blocks=80), 0.2)  # the engine now holds them itself
    assert reg.view("decode").free_kv_tokens[0] == 80 * 16


def test_observed_latencies_correct_an_instances_predictions():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode")
    for i in range(40):  # this instance prefills twice as slowly as its profile says
        book(reg, f"r{i}", 100, prefill="p", decode="d")
        reg.prefill_done(f"r{i}", 2 * FAST.prefill_ms(100, 0), now_s=0.0)
        reg.release(f"r{i}", tpot_ms=0.5 * reg.instances["d"].profile.step_ms(1, 100))
    view = reg.view("prefill")
    assert math.isclose(view.prefill_base_ms[0] + 100 * view.prefill_ms_per_token[0], 2 * FAST.prefill_ms(100, 0),
                        rel_tol=0.01)
    d = reg.instances["d"]
    assert math.isclose(d.step_fix.current.ms(*d.profile.step_parts_ms(1, 100)), 0.5 * d.profile.step_ms(1, 100),
                        rel_tol=0.01)


def test_an_instance_without_observations_of_its_own_starts_from_its_types():
    reg = registry()
    add(reg, "p", "prefill", accelerator="FAST")
    add(reg, "d", "decode", accelerator="FAST")
    for i in range(20):  # prefill instances of this type run at half the profile's time
        book(reg, f"r{i}", 100, prefill="p", decode="d")
        reg.prefill_done(f"r{i}", 0.5 * FAST.prefill_ms(100, 0), now_s=0.0)
        reg.release(f"r{i}")
    d = reg.instances["d"]  # it never prefilled anything itself: its local prefill leans on p's
    assert d.prefill_fix.own.observations == 0 and d.prefill_fix.current is d.prefill_fix.shared
    add(reg, "p2", "prefill", accelerator="FAST")  # a new replica of the type too
    view = reg.view("prefill")
    assert math.isclose(view.prefill_base_ms[1] + 100 * view.prefill_ms_per_token[1], 0.5 * FAST.prefill_ms(100, 0),
                        rel_tol=0.05)
    add(reg, "slow", "prefill")  # another type learns nothing from it
    slow = reg.instances["slow"].prefill_fix.current
    assert (slow.fixed, slow.per_token) == (1.0, 1.0)


def test_an_instance_seen_slow_and_refused_everything_since_is_predicted_faster_as_its_reports_come():
    reg = registry()
    add(reg, "p", "prefill")
    own = reg.instances["p"].prefill_fix.own
    own.fixed, own.per_token, own.observations = 8.0, 8.0, 5
    for t in range(1, 302):  # 150 s of reports, no request admitted: 30 s quiet, then four half-lives: 8x -> 8 ** (1/16)
        add(reg, "p", "prefill", now_s=t * 0.5)
    view = reg.view("prefill")
    assert math.isclose(view.prefill_ms_per_token[0], 8 ** (1 / 16) * reg.instances["p"].profile.prefill_ms_per_token,
                        rel_tol=0.01)


def test_forgets_instances_gone_for_good():
    reg = registry()
    add(reg, "p1", "prefill")
    add(reg, "p2", "prefill", now_s=50.0)
    reg.forget_stale(now_s=61.0)
    assert list(reg.instances) == ["p2"] and reg.view("prefill").replica_ids == ["p2"]
    book(reg, "x", 10, prefill="p2")
    assert reg.view("prefill").load[0] == 1


def test_a_replica_reported_lost_leaves_routing_at_once_and_a_live_one_comes_back_with_its_next_report():
    reg = registry()
    add(reg, "d1", "decode")
    add(reg, "d2", "decode")
    book(reg, "r1", 10, decode="d1")
    reg.forget("d1", "its actor died")
    assert reg.view("decode").replica_ids == ["d2"] and [i.replica_id for i in reg.live("decode", 0.5)] == ["d2"]
    reg.release("r1")  # the lost replica's requests end without error
    reg.forget("d1", "reported twice")  # and a second report of the same loss changes nothing
    reg.report(_report("d1"), now_s=1.0)
    assert sorted(reg.view("decode").replica_ids) == ["d1", "d2"] and reg.instances["d1"].load == 0


def test_a_booking_without_a_release_expires_at_its_requests_deadline():
    reg = registry()
    add(reg, "p", "prefill")
    add(reg, "d", "decode")
    req = RouteRequest("orphan", 100, 10, SLO(1e3, 1e3), lifetime_s=30.0)
    reg.assign(req, Decision(Outcome.ROUTED, Target("p", "", 0, "prefill"), Target("d", "a:1", 0, "decode")), now_s=0.0)
    reg.expire(now_s=29.0)
    assert reg.instances["p"].load == reg.instances["d"].load == 1  # the ingress may still release it
    reg.expire(now_s=31.0)  # its ingress died, or the release was lost: the instances are free again
    assert reg.instances["p"].load == reg.instances["d"].load == 0
    assert reg.view("decode").load[0] == reg.view("prefill").load[0] == 0
    reg.release("orphan")  # a release that does come late changes nothing
    assert reg.instances["d"].load == 0


def test_a_request_routed_again_under_the_same_id_is_booked_once_on_its_latest_route():
    reg = registry()
    add(reg, "d1", "decode")
    add(reg, "d2", "decode")
    req = RouteRequest("same", 100, 10, SLO(1e3, 1e3))
    reg.assign(req, Decision(Outcome.ROUTED, None, Target("d1", "a:1", 0, "decode")), now_s=0.0)
    reg.assign(req, Decision(Outcome.ROUTED, None, Target("d2", "a:1", 0, "decode")), now_s=0.1)  # the ingress asked again
    assert (reg.instances["d1"].load, reg.instances["d2"].load) == (0, 1)
    reg.release("same")
    assert reg.instances["d2"].load == 0


def test_a_replica_that_left_for_good_stays_out_of_routing_while_it_drains_and_still_reports():
    reg = registry()
    add(reg, "d1", "decode")
    add(reg, "d2", "decode")
    book(reg, "streaming", 10, decode="d1")
    reg.forget("d1", "it left the running replicas", now_s=1.0)
    reg.report(_report("d1", running=1), now_s=2.0)  # draining: it finishes its streams, reporting as it goes
    assert reg.view("decode").replica_ids == ["d2"] and "d1" not in reg.instances
    reg.release("streaming")  # its stream ends normally
    assert reg.instances["d2"].load == 0


def test_the_bookings_of_an_ingress_replica_serve_no_longer_runs_go_and_the_others_stay():
    reg = registry()
    add(reg, "d", "decode")
    for rid, ingress, at_s in (("a1", "ingress-a", 0.0), ("b1", "ingress-b", 0.0), ("n1", "ingress-new", 5.0)):
        reg.assign(RouteRequest(rid, 100, 10, SLO(1e3, 1e3), lifetime_s=600.0, ingress_id=ingress),
                   Decision(Outcome.ROUTED, None, Target("d", "a:1", 0, "decode")), now_s=at_s)
    reg.assign(RouteRequest("anon", 100, 10, SLO(1e3, 1e3)), Decision(Outcome.ROUTED, None, Target("d", "a:1", 0, "decode")),
               now_s=0.0)
    # Serve listed ingress-b alone at 4 s: ingress-a died; ingress-new started after that listing
    reg.keep_owners({"ingress-b"}, as_of_s=4.0)
    assert sorted(reg.instances["d"].assignments) == ["anon", "b1", "n1"]
    reg.release("a1")  # a release that does come late changes nothing
    assert reg.instances["d"].load == 3


def test_an_idle_instances_slowness_fades_toward_its_types_speed_not_the_profiles():
    """Both instances of a type run at half the profile's time; one was seen slow once and then left
    idle. It fades back to what its type shows, so it is predicted as fast as its busy sibling."""
    reg = registry()
    add(reg, "p1", "prefill", accelerator="FAST")
    add(reg, "p2", "prefill", accelerator="FAST")
    idle = reg.instances["p2"].prefill_fix
    idle.own.fixed, idle.own.per_token, idle.own.observations = 2.0, 2.0, 5  # its first prefills were slow (cold)
    for i in range(20):  # p1 serves everything, at half the profile's time
        book(reg, f"r{i}", 100, prefill="p1", decode=None)
        reg.prefill_done(f"r{i}", 0.5 * FAST.prefill_ms(100, 0), now_s=0.0)
        reg.release(f"r{i}")
    for t in range(1, 541):  # four and a half minutes of reports, p2 admitting nothing
        add(reg, "p1", "prefill", accelerator="FAST", now_s=t * 0.5)
        add(reg, "p2", "prefill", accelerator="FAST", now_s=t * 0.5)
    view = reg.view("prefill")
    busy_ms, idle_ms = view.prefill_base_ms + 100 * view.prefill_ms_per_token
    assert busy_ms < 0.6 * FAST.prefill_ms(100, 0) and math.isclose(idle_ms, busy_ms, rel_tol=0.05)
