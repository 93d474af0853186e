"""The ingress's own view of the live instances: what /health and a waiting prefill go by."""

from pdserve.deployments.instance_view import STALE_POLLS, InstanceView

SNAPSHOT = [{"pool": "prefill", "live": True, "replica_id": "p1"},
            {"pool": "prefill", "live": False, "replica_id": "p2"},
            {"pool": "decode", "live": True, "replica_id": "d1"}]


def test_a_replica_seen_live_that_left_or_stopped_reporting_is_gone():
    view = InstanceView(["prefill", "decode"])
    view.observe(SNAPSHOT, now_s=10.0)
    assert view.live == {"prefill": 1, "decode": 1} and not view.gone("p1", 10.5)
    view.observe([SNAPSHOT[2]], now_s=11.0)  # p1 left the controller's instances
    assert view.gone("p1", 11.5)
    view.observe([{**SNAPSHOT[0], "live": False}], now_s=12.0)  # or its reports stopped
    assert view.gone("p1", 12.5)


def test_a_replica_this_view_never_saw_live_is_not_gone():
    """The controller may route to a new replica before this view's next snapshot shows it."""
    view = InstanceView(["prefill", "decode"])
    view.observe(SNAPSHOT, now_s=10.0)
    assert not view.gone("p2", 10.5) and not view.gone("new", 10.5)


def test_a_stale_view_says_no_replica_is_gone():
    view = InstanceView(["prefill", "decode"])
    assert not view.gone("p2", 0.0)  # no snapshot yet
    view.observe(SNAPSHOT, now_s=10.0)
    assert not view.gone("p2", 10.0 + STALE_POLLS * view.poll_interval_s + 0.1)


def test_the_service_serves_with_a_live_instance_of_every_role_and_of_any_adaptive_pool():
    disaggregated = InstanceView(["prefill", "decode"])
    disaggregated.observe(SNAPSHOT, now_s=10.0)
    assert disaggregated.serves()
    disaggregated.observe(SNAPSHOT[:2], now_s=11.0)  # no decode instance
    assert not disaggregated.serves()
    adaptive = InstanceView(["adaptive", "adaptive-l4"])
    assert not adaptive.serves()  # no snapshot yet
    adaptive.observe([{"pool": "adaptive-l4", "live": True, "replica_id": "a1"}], now_s=10.0)
    assert adaptive.live == {"adaptive": 0, "adaptive-l4": 1} and adaptive.serves()
    adaptive.observe([{"pool": "adaptive", "live": False, "replica_id": "a2"}], now_s=11.0)
    assert not adaptive.serves()
