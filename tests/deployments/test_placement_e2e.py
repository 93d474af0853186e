"""Heterogeneous placement: on a Ray cluster whose nodes carry different accelerator
types, the prefill pool lands only on one node type and the decode pool only on the other."""

from __future__ import annotations

import os
import warnings

import pytest

from pdserve.deployments import service
from pdserve.model_store import resolve_model
from tests.deployments.service_fixtures import RAY_START_ATTEMPTS, service_config

pytestmark = pytest.mark.slow


def _two_node_types(cluster_class):
    """A local cluster with two nodes of each accelerator type, one CPU each (the pools must pick
    by type, not by free room). Ray gives each raylet a fixed 30 s to register, which a loaded CI
    machine can miss: a start that does is torn down and tried again, as `init_ray` does."""
    attempt = 1
    while True:
        cluster = cluster_class(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            nodes = {kind: [cluster.add_node(num_cpus=1, resources={f"accelerator_type:{kind.upper()}GPU": 1})
                            for _ in range(2)] for kind in ("fast", "cheap")}
            cluster.wait_for_nodes()
            return cluster, nodes
        except Exception as e:
            cluster.shutdown()
            if "timed out during startup" not in str(e) or attempt == RAY_START_ATTEMPTS:
                raise
            warnings.warn(f"Ray cluster start {attempt} of {RAY_START_ATTEMPTS} failed ({e})", stacklevel=2)
            attempt += 1


def test_prefill_and_decode_replicas_land_on_their_own_accelerator_type():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster, nodes = _two_node_types(Cluster)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = service_config(
            ray_address=cluster.address,
            prefill={"accelerator_type": "FASTGPU", "cpu_binds": ["0"]},
            decode={"accelerator_type": "CHEAPGPU", "cpu_binds": ["1"]},
        )
        svc = service.start(cfg, str(resolve_model(None)))
        try:
            node_ids = {kind: {n.node_id for n in ns} for kind, ns in nodes.items()}
            instances = serve.get_deployment_handle("controller", cfg.app_name).snapshot.remote().result()
            by_pool = {i["pool"]: i for i in instances}
            assert by_pool["prefill"]["node_id"] in node_ids["fast"]
            assert by_pool["decode"]["node_id"] in node_ids["cheap"]
            assert (by_pool["prefill"]["accelerator_type"], by_pool["decode"]["accelerator_type"]) == (
                "FASTGPU", "CHEAPGPU")

            import openai

            client = openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
            r = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert "Paris" in r.choices[0].message.content
        finally:
            svc.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
