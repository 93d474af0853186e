"""Sizing decisions as KubeRay worker-group replicas, for clusters where KubeRay's in-tree
autoscaler is off: without it, a Serve replica the controller adds has no pod to run on.

The actuator reads and patches ONE RayService (its RBAC role grants get/patch on that name
only), never lists, and writes nothing but `workerGroupSpecs[i].replicas`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiClient, ApiException, CustomObjectsApi

from pdserve.config.autoscaling import KubernetesTarget
from pdserve.controller.autoscaling.actuator import Actuator

log = logging.getLogger("pdserve.autoscale")

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
GROUPS_PATH = "/spec/rayClusterConfig/workerGroupSpecs"
JSON_PATCH = "application/json-patch+json"
"""The client defaults custom-object patches to merge-patch even for a list body; a merge patch
would replace the whole workerGroupSpecs list, so the content type is set explicitly."""


class KubernetesActuatorError(RuntimeError):
    """The RayService could not be read or resized; the message names the object and verb."""


class KubernetesActuator(Actuator):
    """Serve replicas per pool <-> worker-group pods: ceil(replicas / replicas_per_pod)."""

    def __init__(self, target: KubernetesTarget, api_client: ApiClient | None = None) -> None:
        self._target = target
        self._api = CustomObjectsApi(api_client if api_client is not None else _load_client(target.in_cluster))
        self._what = f"rayservice {target.namespace}/{target.rayservice}"

    def current(self) -> dict[str, int]:
        groups = self._groups(self._call("get"))
        return {pool: _replicas(groups[name][1]) * self._per_pod(pool)
                for pool, name in self._target.worker_groups.items()}

    def apply(self, replicas: dict[str, int]) -> None:
        """One JSON patch for every group that changes, each `replace` guarded by a `test` of
        the group's name at that index: if someone reorders or renames the groups between our
        read and our write, the whole patch fails instead of resizing the wrong group."""
        groups = self._groups(self._call("get"))
        ops: list[dict[str, Any]] = []
        changes: list[tuple[Any, ...]] = []
        for pool, serve_replicas in replicas.items():
            name = self._target.worker_groups.get(pool)
            if name is None:
                continue  # a pool on nodes this target does not manage stays as it is
            if serve_replicas < 0:
                raise ValueError(f"{pool}: negative replicas {serve_replicas}")
            index, spec = groups[name]
            per_pod = self._per_pod(pool)
            want = self._clamp(name, spec, math.ceil(serve_replicas / per_pod))
            have = _replicas(spec)
            if want == have:
                continue
            at = f"{GROUPS_PATH}/{index}"
            ops += [{"op": "test", "path": f"{at}/groupName", "value": name},
                    {"op": "replace" if "replicas" in spec else "add", "path": f"{at}/replicas", "value": want}]
            changes.append((name, have, want, pool, serve_replicas, per_pod))
        if ops:
            self._call("patch", ops)
        for change in changes:  # after the patch: a failed one raised and resized nothing
            log.info("kubernetes: %s group %s replicas %d -> %d (%s: %d serve replicas, %d per pod)",
                     self._what, *change)

    def _per_pod(self, pool: str) -> int:
        return self._target.replicas_per_pod.get(pool, 1)

    def _clamp(self, name: str, spec: dict[str, Any], pods: int) -> int:
        """KubeRay rejects or overrides replicas outside [minReplicas, maxReplicas]; clamping here
        keeps our log and `current()` truthful and says that the policy asks for more (or less)."""
        low, high = spec.get("minReplicas", 0), spec.get("maxReplicas")
        clamped = max(low, pods if high is None else min(pods, high))
        if clamped != pods:
            log.warning("kubernetes: %s group %s wants %d pods, clamped to %d (minReplicas %s, maxReplicas %s)",
                        self._what, name, pods, clamped, low, high)
        return clamped

    def _groups(self, obj: dict[str, Any]) -> dict[str, tuple[int, dict[str, Any]]]:
        """Configured group name -> (index in workerGroupSpecs, spec); every one must exist."""
        specs = obj.get("spec", {}).get("rayClusterConfig", {}).get("workerGroupSpecs") or []
        found = {spec.get("groupName"): (i, spec) for i, spec in enumerate(specs)}
        for pool, name in self._target.worker_groups.items():
            if name not in found:
                raise KubernetesActuatorError(
                    f"kubernetes: {self._what} has no worker group {name!r} (configured for pool {pool}); "
                    f"its groups are {sorted(str(n) for n in found)}")
        return found

    def _call(self, verb: str, body: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """get or patch the one object; errors name object and verb, never headers or tokens."""
        args = (GROUP, VERSION, self._target.namespace, PLURAL, self._target.rayservice)
        try:
            if verb == "get":
                return self._api.get_namespaced_custom_object(*args)
            return self._api.patch_namespaced_custom_object(*args, body, _content_type=JSON_PATCH)
        except ApiException as e:
            # A real API server answers a failed JSON-patch `test` with 422 (kmock: 500).
            hint = " (the worker groups changed since they were read; nothing was resized)" if e.status == 422 else ""
            raise KubernetesActuatorError(
                f"kubernetes: {verb} {self._what} failed: HTTP {e.status} {e.reason}: {_status_message(e)}{hint}"
            ) from None
        except urllib3.exceptions.HTTPError as e:
            raise KubernetesActuatorError(f"kubernetes: {verb} {self._what} failed: {type(e).__name__}") from None


def _replicas(spec: dict[str, Any]) -> int:
    """KubeRay treats a missing `replicas` as `minReplicas`."""
    return int(spec.get("replicas", spec.get("minReplicas", 0)))


def _status_message(e: ApiException) -> str:
    """The API server's Status.message only: the exception's own text carries HTTP headers."""
    try:
        return str(json.loads(e.body).get("message", ""))[:300]
    except (TypeError, ValueError, AttributeError):
        return ""


def _load_client(in_cluster: bool) -> ApiClient:
    config = kubernetes.client.Configuration()
    if in_cluster:
        kubernetes.config.load_incluster_config(client_configuration=config)
    else:
        kubernetes.config.load_kube_config(client_configuration=config)
    return ApiClient(config)
