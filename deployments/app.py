"""Builds the Ray Serve application from a ClusterConfig: controller, engine pools,
ingress. Building is separate from the server classes so tests and operators can
inspect what would be deployed."""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from pdserve.controller.server import Controller
from pdserve.decode.server import ColocatedServer, DecodeServer
from pdserve.deployments.config import ClusterConfig
from pdserve.deployments.exact_router import ExactReplicaRouter
from pdserve.deployments.ingress import Ingress
from pdserve.prefill.server import PrefillServer

_SERVERS = {"prefill": PrefillServer, "decode": DecodeServer, "colocated": ColocatedServer}
# Engines take tens of seconds to load; Serve's health checks must not kill them meanwhile.
_ENGINE_HEALTH = {"health_check_period_s": 10.0, "health_check_timeout_s": 60.0, "graceful_shutdown_timeout_s": 30.0}


def build_app(cfg: ClusterConfig, model_path: str) -> Application:
    controller = serve.deployment(Controller).options(
        name="controller", num_replicas=1, ray_actor_options={"num_cpus": 0}
    ).bind(cfg.mode)
    pools = {}
    for role, pool in cfg.pools().items():
        pools[role] = serve.deployment(_SERVERS[role]).options(
            name=role,
            num_replicas=pool.replicas,
            max_ongoing_requests=pool.max_ongoing_requests,
            ray_actor_options=pool.ray_actor_options(),
            request_router_config=RequestRouterConfig(request_router_class=ExactReplicaRouter),
            **_ENGINE_HEALTH,
        ).bind(cfg, model_path, controller)
    return serve.deployment(Ingress).options(
        name="ingress", num_replicas=cfg.ingress.replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
    ).bind(cfg, model_path, controller, pools)
