import pytest

from pdserve.bench import route_call_bench

pytestmark = pytest.mark.slow  # a Ray cluster and the controller's Serve application


def test_the_route_call_benchmark_times_both_paths_to_a_real_controller_that_routes():
    report = route_call_bench.run(calls=10, rounds=2, n_instances=4)
    for path in ("serve_handle", "socket"):
        r = report[path]
        assert len(r["p50_ms_by_round"]) == 2 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert report["calls_per_path"] == 20 and report["routed"] == 40  # every call routed, on both paths
