"""The cluster config's `autoscaling` section: which policy file to follow and where its
decisions take effect. The policy says how to size the pools; this says what to resize."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from pdserve.config.autoscaling_policy import AutoscalingPolicy, load_policy


class KubernetesTarget(BaseModel):
    """A RayService whose worker groups are resized directly, for clusters where KubeRay's
    in-tree autoscaler is off (with it on, pending Serve replicas become pods by themselves)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    namespace: str = "default"
    rayservice: str
    """Name of the RayService object; the actuator's RBAC role is limited to it."""
    worker_groups: dict[str, str]
    """Worker group name per pool, e.g. {prefill: h100-prefill, decode: l4-decode}."""
    replicas_per_pod: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    """Serve replicas one worker pod of the pool holds (its GPUs / the replica's); 1 if unset."""
    in_cluster: bool = True
    """Use the pod's service account; False reads the local kubeconfig (operators, tests)."""


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    policy_file: str
    """Path of the autoscaling policy YAML (on Kubernetes, the chart's ConfigMap mount)."""
    kubernetes: KubernetesTarget | None = None
    """Also patch these worker groups' replicas; None relies on KubeRay's in-tree autoscaling
    (or on a cluster with fixed nodes) to provide the nodes."""
    _policy: AutoscalingPolicy | None = PrivateAttr(None)

    def policy(self) -> AutoscalingPolicy:
        """The policy file's contents, read once: loading the config checks it, deploying uses it
        (PolicyError when it cannot be used)."""
        if self._policy is None:
            self._policy = load_policy(self.policy_file)
        return self._policy
