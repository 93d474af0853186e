"""The engines' vLLM metrics as the ingress serves them: one family per name across replicas,
every sample labelled with its pool and replica, nothing but vLLM's own families."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.deployments.engine_metrics import render_engine_metrics


def _replica_text(waiting: float, prompt_tokens: float) -> str:
    """What one engine replica's registry exposes: vLLM's metrics and some that are not vLLM's."""
    r = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "Requests waiting", ["engine", "model_name"], registry=r).labels(
        "0", "m").set(waiting)
    Counter("vllm:prompt_tokens", "Prompt tokens", ["engine", "model_name"], registry=r).labels(
        "0", "m").inc(prompt_tokens)
    Histogram("vllm:e2e_request_latency_seconds", "Latency", ["engine"], buckets=(0.5, 1.0), registry=r).labels(
        "0").observe(0.7)
    Gauge("python_gc_objects", "not vLLM's", registry=r).set(1)
    return generate_latest(r).decode()


def test_every_replicas_vllm_families_come_once_each_labelled_with_pool_and_replica():
    text = render_engine_metrics({("decode", "d1"): _replica_text(3, 10), ("prefill", "p1"): _replica_text(0, 99)})
    # (prometheus_client writes a counter's or histogram's creation time as a family of its own)
    families = {f.name: f for f in text_string_to_metric_families(text.decode()) if not f.name.endswith("_created")}
    assert set(families) == {"vllm:num_requests_waiting", "vllm:prompt_tokens", "vllm:e2e_request_latency_seconds"}
    assert text.decode().count("# TYPE vllm:num_requests_waiting gauge") == 1
    waiting = {(s.labels["pool"], s.labels["replica"]): s.value for s in families["vllm:num_requests_waiting"].samples}
    assert waiting == {("decode", "d1"): 3.0, ("prefill", "p1"): 0.0}
    prompt = {s.labels["pool"]: s.value for s in families["vllm:prompt_tokens"].samples if s.name.endswith("_total")}
    assert prompt == {"decode": 10.0, "prefill": 99.0}
    buckets = [s for s in families["vllm:e2e_request_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["le"] for s in buckets} == {"0.5", "1.0", "+Inf"} and len(buckets) == 6
    assert all(s.labels["engine"] == "0" for f in families.values() for s in f.samples)


def test_no_replica_no_families():
    assert render_engine_metrics({}) == b""
