"""Helpers for the end-to-end tests that run a whole pdserve service on real engines."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

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
        "ingress": {"http_port": free_port(), "grpc_port": free_port(), "direct_http_port": free_port()},
        "log_level": "WARNING",
        "routing": {"local_prefill_max_tokens": 8},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_config(base)


RAY_START_ATTEMPTS = 3
"""Ray gives a new node's raylet a fixed 30 s to register with the GCS; on a loaded CI machine a
start can miss that once (every test of the module then errors at setup), so it is tried again."""


def init_ray(num_cpus: int = 4, **kwargs) -> None:
    """A new local Ray cluster, never one found through /tmp/ray/ray_current_cluster: another
    test run on the same machine (ray.cluster_utils.Cluster writes that file) must not leak in.
    A start whose raylet does not register in time is torn down (its processes killed by PID,
    the raylet's last log lines kept as a warning) and tried again."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == RAY_START_ATTEMPTS:
                raise
            warnings.warn(
                f"Ray start {attempt} of {RAY_START_ATTEMPTS} failed ({e}); raylet log tail:\n{_raylet_log_tail()}",
                stacklevel=2,
            )
            _kill_started_since(before)
            ray.shutdown()


def _raylet_log_tail(lines: int = 20) -> str:
    """The last lines of the newest session's raylet logs: why it did not register."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    tails = []
    for name in ("raylet.err", "raylet.out", "gcs_server.err"):
        path = logs / name
        if path.exists():
            tails.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(tails) or f"(no raylet logs under {logs})"


def _kill_started_since(before: set[int]) -> None:
    """Kill the processes a failed Ray start left (GCS, raylet and what they spawned)."""
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for proc in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(started, timeout=10)


@contextmanager
def running_service(cfg: ClusterConfig, model_path: str, num_cpus: int,
                    resources: dict[str, float] | None = None) -> Iterator[service.Service]:
    """`cfg` served on a new local Ray cluster of `num_cpus` (and custom `resources`); all of it
    torn down afterwards."""
    import ray
    from ray import serve

    init_ray(num_cpus=num_cpus, resources=resources)
    s = None
    try:
        s = service.start(cfg, model_path)
        yield s
    finally:
        if s is not None:
            s.delete()
        serve.shutdown()
        ray.shutdown()


def routing_decisions(svc: service.Service) -> dict[str, str]:
    """The controller's routing decision of every request the service answered, by request id
    (the id its client saw, less OpenAI's `chatcmpl-`/`cmpl-`), from the ingress's trace spans."""
    from ray import serve

    spans = serve.get_deployment_handle("ingress", svc.cfg.app_name).finished_spans.remote().result()
    roots = {s["trace_id"]: s["attributes"]["pdserve.request_id"] for s in spans if s["name"] == "ingress"}
    return {roots[s["trace_id"]]: s["attributes"]["pdserve.decision"] for s in spans
            if s["name"] == "routing" and s["trace_id"] in roots}
