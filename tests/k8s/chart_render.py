"""Renders the Helm chart for the k8s tests (test_chart, test_chart_security) and picks apart
what it renders: the values variants both modules render, the manifests by kind, the mounted
files, the pod templates, the Ray resources and Secrets they carry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
NAMESPACE = "serving"

_spec = importlib.util.spec_from_file_location("render_manifests", K8S / "render_manifests.py")
render_manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_manifests)

VARIANTS = {
    "defaults": {},
    "pdserve_patches_worker_groups": {"enableInTreeAutoscaling": False},
    "two_gpu_types": {
        "pools": {"prefill": {"acceleratorType": "H100", "gpusPerReplica": 2, "replicasPerPod": 4, "replicas": 2,
                              "minReplicas": 1, "maxReplicas": 8, "nodeSelector": {"gpu": "h100"},
                              "resources": {"requests": {"cpu": "18", "memory": "256Gi"},
                                            "limits": {"memory": "256Gi"}},
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
                  "decode": {"acceleratorType": "L4", "replicasPerPod": 2, "replicas": 3, "minReplicas": 2,
                             "maxReplicas": 16, "nodeSelector": {"gpu": "l4"}}},
        "autoscaling": {"policy": {"gpu_budget": 40, "gpu_cost_per_hour": {"H100": 4.0, "L4": 0.8},
                                   "decode": {"kv_usage_target": 0.9}}},
        "apiKeys": {"keys": ["key-a", "key-b"]},
    },
    "existing_secrets": {"kvTransfer": {"existingSecret": "team-kv", "existingSecretKey": "token"},
                         "apiKeys": {"existingSecret": "team-api-keys"}, "rayAuth": {"existingSecret": "team-ray-token"}},
    "autoscaling_off": {"autoscaling": {"enabled": False}},
    # One pool of engines that both prefill and decode, two per pod (pdserve's autoscaling is off).
    "adaptive": {"mode": "adaptive", "autoscaling": {"enabled": False},
                 "pools": {"adaptive": {"acceleratorType": "H100", "replicasPerPod": 2, "replicas": 4,
                                        "minReplicas": 2, "maxReplicas": 8}}},
    # Tensor-parallel engines on both sides (each rank moves its share of the KV heads): a decode
    # pod's two replicas take two KV receiver ports each.
    "tensor_parallel": {"pools": {"prefill": {"gpusPerReplica": 4, "engineArgs": {"tensor_parallel_size": 4}},
                                  "decode": {"gpusPerReplica": 2, "replicasPerPod": 2, "replicas": 2,
                                             "engineArgs": {"tensor_parallel_size": 2}}}},
    # Adaptive engines on two GPU types: the L4 pool takes what it does not set from pools.adaptive.
    "two_adaptive_pools": {"mode": "adaptive", "autoscaling": {"enabled": False},
                           "pools": {"adaptive": {"acceleratorType": "H100", "replicas": 2, "minReplicas": 1},
                                     "adaptive-l4": {"acceleratorType": "L4", "replicasPerPod": 3, "replicas": 6,
                                                     "maxReplicas": 12, "nodeSelector": {"gpu": "l4"}}}},
    # Nothing calls the Kubernetes API; clients only from the gateway namespace, over mutual TLS.
    "static_pools_behind_a_gateway": {
        "enableInTreeAutoscaling": False, "autoscaling": {"enabled": False},
        "networkPolicy": {"clientFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]},
        "ingress": {"grpcTls": {"existingSecret": "pdserve-grpc-tls", "requireClientCerts": True}},
    },
}


def render(values: dict | None = None) -> list[dict]:
    return [yaml.safe_load(d) for d in render_manifests.render(values, namespace=NAMESPACE)]


def only(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def files(docs: list[dict]) -> dict[str, dict]:
    """The ConfigMap's files, parsed."""
    return {name: yaml.safe_load(text) for name, text in only(docs, "ConfigMap")["data"].items()}


def pods(docs: list[dict]) -> dict[str, dict]:
    """Pod templates by group: "head" and each worker group's name."""
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}


def _ray_resources(group: dict) -> dict[str, float]:
    """KubeRay pastes the value into `ray start --resources=...`: single quotes keep the JSON whole."""
    value = group["rayStartParams"]["resources"]
    assert value.startswith("'") and value.endswith("'"), value
    return json.loads(value[1:-1])


def _secret_holding(docs: list[dict], key: str) -> dict:
    [secret] = [d for d in docs if d["kind"] == "Secret" and key in {**d.get("data", {}), **d.get("stringData", {})}]
    return secret


def kv_roles(values: dict) -> tuple[list[str], list[str]]:
    """(the pools whose pods send KV, the pools whose pods receive it) for these values."""
    if values.get("mode") == "adaptive":
        adaptive = ["adaptive", *sorted(p for p in values.get("pools", {}) if p.startswith("adaptive-"))]
        return adaptive, adaptive
    return ["prefill"], ["decode"]
