from pdserve.bench import route_bench


def test_the_route_benchmark_times_every_router_on_a_loaded_registry():
    report = route_bench.run(n_instances=40, n_decisions=250, seed=3, cached_tokens_per_instance=4096)
    for name in ("slo", "slo_slow_links_between_nodes", "least_load", "slo_decision_and_booking", "slo_prefix_aware"):
        r = report[name]
        assert r["decisions"] == 250 and 0 < r["p50_us"] <= r["p99_us"]
    assert report["slo"]["routed"] > 0 and report["slo_prefix_aware"]["routed"] > 0
