"""Builds the Ray Serve application from a ClusterConfig: controller, engine pools,
ingress. Building is separate from the server classes so tests and operators can
inspect what would be deployed."""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from pdserve.config.cluster import ClusterConfig, pool_role
from pdserve.controller.server import Controller
from pdserve.decode.adaptive import AdaptiveServer
from pdserve.decode.colocated import ColocatedServer
from pdserve.decode.server import DecodeServer
from pdserve.deployments.exact_router import ExactReplicaRouter
from pdserve.deployments.ingress import Ingress
from pdserve.deployments.route_channel import route_channel_secret
from pdserve.prefill.server import PrefillServer

_SERVERS = {"prefill": PrefillServer, "decode": DecodeServer, "colocated": ColocatedServer, "adaptive": AdaptiveServer}
# Engines take tens of seconds to load; Serve's health checks must not kill them meanwhile.
_ENGINE_HEALTH = {"health_check_period_s": 10.0, "health_check_timeout_s": 60.0, "graceful_shutdown_timeout_s": 30.0}


def kv_bytes_per_token(model_path: str, dtype: str) -> int:
    """KV cache bytes one token of context takes (keys and values, every layer): what a
    prompt's transfer moves, per token."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_path)
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    element = 4 if dtype == "float32" else 2  # "auto" on GPUs: 16-bit, what served checkpoints carry
    return 2 * hf.num_hidden_layers * kv_heads * head_dim * element


def build_app(cfg: ClusterConfig, model_path: str) -> Application:
    # Every routing decision and load report goes through this one replica: Serve's default
    # limit of 5 calls at once would queue decisions (and refusals) behind each other. It starts
    # in a moment, so a dead one is looked for often: requests wait for routing meanwhile.
    controller = serve.deployment(Controller).options(
        name="controller", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
        health_check_period_s=1.0, health_check_timeout_s=10.0,
    ).bind(cfg.mode, cfg.routing, kv_bytes_per_token(model_path, cfg.engine_dtype), cfg.slo.on_unmeetable == "best_effort",
           cfg.log_level, cfg.app_name,
           (cfg.autoscaling, cfg.autoscaling.policy()) if cfg.autoscaling else None,
           {role: pool.experts.window_s for role, pool in cfg.pools().items() if pool.experts},
           route_channel_secret(cfg))
    pools = {}
    for name, pool in cfg.pools().items():
        pools[name] = serve.deployment(_SERVERS[pool_role(name)]).options(
            name=name,
            num_replicas=pool.replicas,
            max_ongoing_requests=pool.max_ongoing_requests,
            ray_actor_options=pool.ray_actor_options(),
            request_router_config=RequestRouterConfig(request_router_class=ExactReplicaRouter),
            **_ENGINE_HEALTH,
        ).bind(cfg, model_path, controller)
    return serve.deployment(Ingress).options(
        name="ingress", num_replicas=cfg.ingress.replicas,
        ray_actor_options={"num_cpus": 0, **({"resources": cfg.ingress.resources} if cfg.ingress.resources else {})},
        max_ongoing_requests=10_000,
    ).bind(cfg, model_path, controller, pools)
