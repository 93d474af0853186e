from pdserve.controller.decision import Outcome
from pdserve.controller.least_load import choose_least_load

from .routing_states import add, book, registry, request


def route(reg, colocated=False, now_s=0.0):
    prefill = None if colocated else reg.view("prefill")
    return choose_least_load(request(10), prefill, reg.view("colocated" if colocated else "decode"),
                             now_s - reg.ttl_s)


def test_picks_the_least_loaded_instance_of_each_pool():
    reg = registry()
    add(reg, "p1", "prefill", running=3)
    add(reg, "p2", "prefill", running=1)
    add(reg, "d1", "decode", running=2)
    add(reg, "d2", "decode")
    d = route(reg)
    assert d.outcome is Outcome.ROUTED
    assert (d.prefill.replica_id, d.decode.replica_id) == ("p2", "d2")
    assert d.decode.kv_addr.startswith("10.0.0.1:") and (d.prefill.tp_size, d.decode.tp_size) == (1, 1)
    add(reg, "d2", "decode", tp_size=2)
    assert route(reg).decode.tp_size == 2


def test_load_is_relative_to_each_instance_capacity():
    reg = registry()
    add(reg, "small", "prefill", running=1, max_ongoing=2)
    add(reg, "big", "prefill", running=2, max_ongoing=16)
    add(reg, "d", "decode")
    assert route(reg).prefill.replica_id == "big"


def test_full_pool_is_overloaded_and_empty_pool_unavailable():
    reg = registry()
    add(reg, "p", "prefill", max_ongoing=1)
    book(reg, "x", 10, prefill="p")
    add(reg, "d", "decode")
    full = route(reg)
    assert full.outcome is Outcome.OVERLOADED and "p=1/1" in full.reason
    empty = registry()
    add(empty, "p", "prefill")
    assert route(empty).outcome is Outcome.UNAVAILABLE


def test_colocated_routes_to_one_instance():
    reg = registry()
    add(reg, "c1", "colocated", running=2)
    add(reg, "c2", "colocated", running=1)
    d = route(reg, colocated=True)
    assert d.prefill is None and d.decode.replica_id == "c2"
    assert [t.replica_id for t in d.targets()] == ["c2"]
