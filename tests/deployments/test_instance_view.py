"""The ingress's own view of the live instances: what /health and a waiting prefill go by."""

from pdserve.deployments.instance_view import STALE_POLLS, InstanceView

SNAPSHOT = [{"pool": "prefill", "live": True, "replica_id": "p1"},
            {"pool": "prefill", "live": False, "replica_id": "p2"},
            {"pool": "decode", "live": True, "replica_id": "d1"}]


def test_a_replica_missing_or_not_live_in_a_fresh_view_is_gone():
    view = InstanceView(["prefill", "decode"])
    view.observe(SNAPSHOT, now_s=10.0)
    assert view.live == {"prefill": 1, "decode": 1}
    assert not view.gone("p1", 10.5) and view.gone("p2", 10.5) and view.gone("p9", 10.5)


def test_a_stale_view_says_no_replica_is_gone():
    view = InstanceView(["prefill", "decode"])
    assert not view.gone("p2", 0.0)  # no snapshot yet
    view.observe(SNAPSHOT, now_s=10.0)
    assert not view.gone("p2", 10.0 + STALE_POLLS * view.poll_interval_s + 0.1)
