"""Autoscaling a whole service on real engines: load on the decode pool makes the controller
add a decode replica (a real vLLM engine that joins routing), and the pool shrinks back when
the load ends; every request sent meanwhile completes."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
import yaml

from pdserve.deployments import service
from pdserve.model_store import resolve_model
from tests.deployments.service_fixtures import init_ray, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

# Decode sized on running sequences alone, with a profile that makes one replica hold 3 at
# TPOT 100 ms: four streams need a second replica, none needs one. Prefill stays at one.
POLICY = {
    "interval_s": 2, "window_s": 10,
    "prefill": {"min_replicas": 1, "max_replicas": 1},
    "decode": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 10,
               "tpot_ms": 100, "signals": ["running_seqs"],
               "profile": {"prefill_base_ms": 600, "prefill_ms_per_token": 1, "decode_base_ms": 20,
                           "decode_ms_per_seq": 20, "decode_ms_per_1k_context_tokens": 0}},
}


def decode_replicas_running(app: str) -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    return serve.status().applications[app].deployments["decode"].replica_states.get(ReplicaState.RUNNING, 0)


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def test_decode_pool_grows_under_load_and_shrinks_after(tmp_path):
    import ray
    from ray import serve

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(POLICY))
    init_ray(num_cpus=4)
    svc = None
    try:
        # Best effort: the router's early refusals are not what this test is about.
        cfg = service_config(autoscaling={"policy_file": str(policy_file)}, slo={"on_unmeetable": "best_effort"})
        svc = service.start(cfg, str(resolve_model(None)))
        client = openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        assert decode_replicas_running(cfg.app_name) == 1

        stop, done, failures = threading.Event(), [], []

        def stream_until_stopped(worker: int) -> None:
            while not stop.is_set():
                try:
                    r = client.completions.create(model=model, prompt=f"Story {worker}: once upon a time",
                                                  max_tokens=120, temperature=0, extra_body={"ignore_eos": True})
                    done.append(r.usage.completion_tokens)
                except Exception as exc:
                    failures.append(repr(exc))

        workers = [threading.Thread(target=stream_until_stopped, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        try:
            grew = wait_until(lambda: decode_replicas_running(cfg.app_name) == 2, timeout_s=300)
            controller = serve.get_deployment_handle("controller", cfg.app_name)
            live_decode = wait_until(lambda: sum(i["live"] and i["pool"] == "decode"
                                                 for i in controller.snapshot.remote().result()) == 2, timeout_s=30)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=300)
        assert grew, "the decode pool did not reach 2 replicas under load"
        assert live_decode, "the new decode replica did not join routing"
        status = controller.autoscale_status.remote().result()
        print(f"requests completed {len(done)}, failed {len(failures)}; last decision: {status['decode']['reason']}")
        assert not failures, failures[:3]
        assert done and set(done) == {120}

        def shrunk() -> bool:
            return (controller.autoscale_status.remote().result()["decode"]["replicas"] == 1
                    and decode_replicas_running(cfg.app_name) == 1)

        assert wait_until(shrunk, timeout_s=120), controller.autoscale_status.remote().result()["decode"]

        def exported() -> list[str]:
            with urllib.request.urlopen(f"{svc.http_url}/metrics", timeout=30) as r:
                return [line for line in r.read().decode().splitlines()
                        if line.startswith("pdserve_autoscale_desired_replicas")]

        wait_until(lambda: 'pdserve_autoscale_desired_replicas{pool="decode"} 1.0' in exported(), timeout_s=10)
        assert 'pdserve_autoscale_desired_replicas{pool="decode"} 1.0' in exported(), exported()
    finally:
        if svc is not None:
            svc.delete()
        serve.shutdown()
        ray.shutdown()
