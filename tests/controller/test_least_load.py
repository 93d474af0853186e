from pdserve.controller.least_load import Outcome, choose_pair
from pdserve.controller.registry import Instance, LoadReport, Registry


def _inst(rid: str, pool: str, assigned: int = 0, max_ongoing: int = 4) -> Instance:
    kv = f"10.0.0.1:{5000 + len(rid)}" if pool == "decode" else ""
    return Instance(LoadReport(rid, pool, "node", None, kv, max_ongoing, assigned, 1.0), 0.0, assigned)


def test_picks_the_least_loaded_instance_of_each_pool():
    d = choose_pair([_inst("p1", "prefill", 3), _inst("p2", "prefill", 1)],
                    [_inst("d1", "decode", 2), _inst("d2", "decode", 0)])
    assert d.outcome is Outcome.ROUTED
    assert (d.prefill.replica_id, d.decode.replica_id) == ("p2", "d2")
    assert d.decode.kv_addr.startswith("10.0.0.1:")


def test_load_is_relative_to_each_instance_capacity():
    d = choose_pair([_inst("small", "prefill", 1, max_ongoing=2), _inst("big", "prefill", 2, max_ongoing=16)],
                    [_inst("d", "decode")])
    assert d.prefill.replica_id == "big"


def test_full_pool_is_overloaded_and_empty_pool_unavailable():
    full = choose_pair([_inst("p", "prefill", 4)], [_inst("d", "decode")])
    assert full.outcome is Outcome.OVERLOADED and "p=4/4" in full.reason
    empty = choose_pair([_inst("p", "prefill")], [])
    assert empty.outcome is Outcome.UNAVAILABLE and "decode" in empty.reason


def test_colocated_routes_to_one_instance():
    d = choose_pair(None, [_inst("c1", "colocated", 2), _inst("c2", "colocated", 1)])
    assert d.prefill is None and d.decode.replica_id == "c2"
    assert [t.replica_id for t in d.targets()] == ["c2"]


def test_registry_drops_silent_instances_and_takes_them_back():
    reg = Registry(ttl_s=3.0)
    r = LoadReport("d1", "decode", "n", None, "a:1", 8, 0, 100.0)
    reg.report(r, now_s=0.0)
    assert [i.replica_id for i in reg.live("decode", 2.0)] == ["d1"]
    assert reg.live("decode", 5.0) == []
    reg.report(r, now_s=6.0)
    assert [i.replica_id for i in reg.live("decode", 6.5)] == ["d1"]


def test_a_stale_report_does_not_hide_a_release():
    reg = Registry()
    reg.report(LoadReport("d1", "decode", "n", None, "a:1", 2, 0, 100.0), 0.0)
    reg.assign("d1")
    reg.assign("d1")
    reg.report(LoadReport("d1", "decode", "n", None, "a:1", 2, 2, 100.0), 0.1)
    reg.release("d1")
    reg.release("d1")
    assert not reg.instances["d1"].full


def test_an_instance_first_heard_of_starts_from_its_reported_running_count():
    reg = Registry()
    reg.report(LoadReport("d1", "decode", "n", None, "a:1", 8, 3, 100.0), 0.0)
    assert reg.instances["d1"].load == 3
    reg.release("d1")
    assert reg.instances["d1"].load == 2


def test_registry_counts_assignments_until_released_and_resets_on_restart():
    reg = Registry()
    r = LoadReport("d1", "decode", "n", None, "a:1", 8, 0, 100.0)
    reg.report(r, 0.0)
    reg.assign("d1")
    reg.assign("d1")
    reg.release("d1")
    assert reg.instances["d1"].load == 1
    restarted = LoadReport("d1", "decode", "n", None, "a:2", 8, 0, 200.0)
    reg.report(restarted, 1.0)
    assert reg.instances["d1"].load == 0 and reg.instances["d1"].report.kv_addr == "a:2"


def test_registry_forgets_instances_gone_for_good():
    reg = Registry()
    reg.report(LoadReport("p1", "prefill", "n", None, "", 8, 0, 1.0), 0.0)
    reg.forget_stale(now_s=61.0, after_s=60.0)
    assert reg.instances == {}
