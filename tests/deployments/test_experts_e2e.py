"""A disaggregated service on the generated MoE model whose decode pool buffers its experts:
answers equal a colocated all-resident engine's, the controller computes the pool's hot set
from the decode replica's reports and pushes it back, and the pool's figures are exported."""

from __future__ import annotations

import time
import urllib.request

import pytest

from pdserve.deployments import service
from pdserve.moe_checkpoint import prepare_moe_model
from pdserve.ports import free_port
from tests.deployments.service_fixtures import running_service, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]


def _answers(url: str, model_path: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    return [client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0).choices[0].text
            for p in PROMPTS]


def test_a_buffered_decode_pool_answers_like_colocated_and_gets_its_hot_set():
    from ray import serve

    model_path = str(prepare_moe_model())
    cfg = service_config(decode={"experts": {"slots": 8, "policy": "pinned_hot", "window_s": 30}})
    with running_service(cfg, model_path, num_cpus=4) as svc:
        disagg = _answers(svc.http_url, model_path)
        controller = serve.get_deployment_handle("controller", cfg.app_name)
        deadline = time.monotonic() + 10
        while not (status := controller.expert_status.remote().result()).get("decode", {}).get("hot"):
            assert time.monotonic() < deadline, f"no hot set after the decode replica's reports: {status}"
            time.sleep(0.5)
        hot = status["decode"]["hot"]
        assert len(hot) == 4 and all(len(layer) == 8 - 2 for layer in hot)  # slots - top-k per MoE layer
        assert "prefill" not in status  # the prefill pool keeps every expert resident
        decode = serve.get_deployment_handle("decode", cfg.app_name)
        while (held := decode.expert_stats.remote().result()["hot"]) != controller.expert_status.remote().result()[
                "decode"]["hot"]:
            assert time.monotonic() < deadline + 5, f"the decode replica's workers hold {held}, not the pool's hot set"
            time.sleep(0.5)
        assert 0 < status["decode"]["hit_rate"] <= 1 and status["decode"]["tokens"] > 0
        time.sleep(1.5)  # the ingress polls the controller every second
        with urllib.request.urlopen(f"{svc.http_url}/metrics") as r:
            text = r.read().decode()
        for needle in ('pdserve_expert_hit_rate{pool="decode"}', 'pdserve_expert_bytes_moved_per_token{pool="decode"}',
                       'pdserve_expert_stall_seconds_per_token{pool="decode"}'):
            assert needle in text, needle
        svc.delete()  # two engines on two cores at most: the colocated one replaces these
        colo_cfg = service_config(mode="colocated", app_name="colocated", colocated={"replicas": 1, "cpu_binds": ["0"]},
                                  ingress={"http_port": svc.cfg.ingress.http_port, "grpc_port": free_port(),
                                           "route_prefix": "/colocated"})
        colo = service.deploy(colo_cfg, model_path)
        try:
            colocated = _answers(colo.http_url, model_path)
        finally:
            colo.delete()
    assert disagg == colocated
    assert all(disagg)
