"""What the Serve application built from a config deploys, inspected without deploying it."""

from pdserve.config.cluster import parse_config
from pdserve.decode.adaptive import AdaptiveServer
from pdserve.deployments import app as pdserve_app


def test_each_adaptive_pool_is_a_deployment_of_adaptive_engines_on_its_own_hardware(monkeypatch):
    monkeypatch.setattr(pdserve_app, "kv_bytes_per_token", lambda *_: 1)  # reads the checkpoint otherwise
    cfg = parse_config({"mode": "adaptive", "dtype": "bfloat16",
                        "adaptive": {"replicas": 2, "accelerator_type": "H100", "num_gpus": 1},
                        "adaptive_pools": {"l4": {"replicas": 3, "accelerator_type": "L4", "num_gpus": 1}}})
    ingress = pdserve_app.build_app(cfg, "/model")._bound_deployment
    pools = {name: handle._bound_deployment for name, handle in ingress.init_args[3].items()}
    assert list(pools) == ["adaptive", "adaptive-l4"]
    assert all(d.name == name and d.func_or_class is AdaptiveServer for name, d in pools.items())
    assert [(d.num_replicas, d.ray_actor_options["accelerator_type"]) for d in pools.values()] == [(2, "H100"),
                                                                                                (3, "L4")]
