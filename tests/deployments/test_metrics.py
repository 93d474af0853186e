"""The ingress's Prometheus metrics from the controller's snapshot."""

from pdserve.deployments.metrics import IngressMetrics


def _instance(replica_id: str, pool: str, live: bool = True) -> dict:
    return {"replica_id": replica_id, "pool": pool, "load": 2, "queued_prefill_tokens": 700,
            "prefill_correction": {"fixed": 2.5, "per_token": 1.5}, "step_correction": {"fixed": 0.8, "per_token": 1.0},
            "live": live}


def test_each_instance_exports_its_load_queue_and_latency_corrections_and_gone_ones_are_dropped():
    m = IngressMetrics()
    m.observe_instances([_instance("p1", "prefill"), _instance("d1", "decode", live=False)])
    m.observe_instances([_instance("p1", "prefill")])
    text = m.render()[0].decode()
    assert 'pdserve_queued_prefill_tokens{pool="prefill",replica="p1"} 700.0' in text
    assert 'pdserve_latency_correction{part="fixed",phase="prefill",pool="prefill",replica="p1"} 2.5' in text
    assert 'pdserve_latency_correction{part="per_token",phase="prefill",pool="prefill",replica="p1"} 1.5' in text
    assert 'pdserve_latency_correction{part="fixed",phase="step",pool="prefill",replica="p1"} 0.8' in text
    assert 'pdserve_live_instances{pool="prefill"} 1.0' in text
    assert 'replica="d1"' not in text


def test_buffered_pools_export_hit_rate_bytes_and_stall_per_token():
    m = IngressMetrics()
    m.observe_experts({"decode": {"hit_rate": 0.93, "bytes_moved_per_token": 1.5e6, "stall_s_per_token": 0.002,
                                  "tokens": 100, "hot": [[1, 2]]}})
    text = m.render()[0].decode()
    assert 'pdserve_expert_hit_rate{pool="decode"} 0.93' in text
    assert 'pdserve_expert_bytes_moved_per_token{pool="decode"} 1.5e+06' in text
    assert 'pdserve_expert_stall_seconds_per_token{pool="decode"} 0.002' in text
