"""Start and stop a whole pdserve service: Ray (local or joined), Serve's HTTP proxy
and the application. `pdserve serve` and the end-to-end tests both use it."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass

from pydantic import SecretStr

from pdserve.config.cluster import ClusterConfig

log = logging.getLogger("pdserve.service")


@dataclass
class Service:
    cfg: ClusterConfig
    http_url: str
    """Base URL of the application through Serve's proxy (OpenAI's API lives under `/v1`)."""
    grpc_addr: str
    started_ray: bool
    direct_http_url: str | None = None
    """The same API from the ingress replica's own server (`ingress.direct_http_port`), if any."""

    @property
    def fastest_http_url(self) -> str:
        """The ingress's own server where there is one, else the proxy."""
        return self.direct_http_url or self.http_url

    def delete(self) -> None:
        """Delete the application (if still there); its engines shut down in their replicas."""
        from ray import serve

        if self.cfg.app_name in serve.status().applications:
            serve.delete(self.cfg.app_name)

    def stop(self) -> None:
        """Delete the application, then Serve and, if this process started it, Ray."""
        import ray
        from ray import serve

        log.info("shutting down pdserve")
        try:
            self.delete()
        finally:
            serve.shutdown()
            if self.started_ray:
                ray.shutdown()


def with_secret(cfg: ClusterConfig) -> ClusterConfig:
    """`cfg` with a KV secret: the configured one, PDSERVE_KV_SECRET, or a fresh one for this run."""
    if cfg.kv_transfer.secret_value:
        return cfg
    secret = os.environ.get("PDSERVE_KV_SECRET") or secrets.token_hex(32)
    return cfg.model_copy(update={"kv_transfer": cfg.kv_transfer.model_copy(update={"secret": SecretStr(secret)})})


def _most_replicas(cfg: ClusterConfig) -> list[int]:
    """Replicas each pool may reach: its autoscaling maximum, so a local Ray cluster has room for them."""
    if cfg.autoscaling is None:
        return [pool.replicas for pool in cfg.pools().values()]
    policy = cfg.autoscaling.policy().pools()
    return [max(pool.replicas, policy[role].max_replicas) for role, pool in cfg.pools().items()]


def start(cfg: ClusterConfig, model_path: str) -> Service:
    """Deploy `cfg` and return once every replica is up."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray's addresses on loopback
    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:
            need = sum(most * pool.num_cpus for most, pool in zip(_most_replicas(cfg), cfg.pools().values(), strict=True))
            # "local": a new cluster even where another one left its address in /tmp/ray.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                     include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": cfg.ingress.host, "port": cfg.ingress.http_port})
        return deploy(cfg, model_path, started_ray)
    except BaseException:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
        raise


def deploy(cfg: ClusterConfig, model_path: str, started_ray: bool = False) -> Service:
    """Deploy `cfg` as one more application on the running Serve instance."""
    from ray import serve

    from pdserve.deployments.app import build_app

    cfg = with_secret(cfg)
    # The controller's autoscaler sets the pools' replica counts through Serve's external-scaler API.
    external = cfg.external_scaler_enabled if cfg.external_scaler_enabled is not None else cfg.autoscaling is not None
    serve.run(build_app(cfg, model_path), name=cfg.app_name, route_prefix=cfg.ingress.route_prefix,
              external_scaler_enabled=external)
    ing = cfg.ingress
    host, prefix = ing.host, ing.route_prefix.rstrip("/")
    direct = None if ing.direct_http_port is None else f"http://{host}:{ing.direct_http_port}{prefix}"
    return Service(cfg, f"http://{host}:{ing.http_port}{prefix}", f"{host}:{ing.grpc_port}", started_ray, direct)
