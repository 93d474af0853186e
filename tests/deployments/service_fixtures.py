"""Helpers for the end-to-end tests that run a whole pdserve service on real engines."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from pdserve.config.cluster import ClusterConfig, parse_config
from pdserve.deployments import service
from pdserve.ports import free_port


def service_config(**overrides) -> ClusterConfig:
    """The default cluster in float32 (greedy output is deterministic), with in-memory
    tracing and free ports, so tests can compare outputs and read spans. Only prompts of
    up to 8 tokens may be prefilled on a decode replica, so chats take the KV path."""
    base = {
        "dtype": "float32",
        "max_model_len": 1024,
        "tracing": {"exporter": "memory"},
        "ingress": {"http_port": free_port(), "grpc_port": free_port()},
        "log_level": "WARNING",
        "routing": {"local_prefill_max_tokens": 8},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_config(base)


def init_ray(num_cpus: int = 4, **kwargs) -> None:
    """A new local Ray cluster, never one found through /tmp/ray/ray_current_cluster: another
    test run on the same machine (ray.cluster_utils.Cluster writes that file) must not leak in."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **kwargs)


@contextmanager
def running_service(cfg: ClusterConfig, model_path: str, num_cpus: int) -> Iterator[service.Service]:
    """`cfg` served on a new local Ray cluster of `num_cpus`; all of it torn down afterwards."""
    import ray
    from ray import serve

    init_ray(num_cpus=num_cpus)
    s = None
    try:
        s = service.start(cfg, model_path)
        yield s
    finally:
        if s is not None:
            s.delete()
        serve.shutdown()
        ray.shutdown()
