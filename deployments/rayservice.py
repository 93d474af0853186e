"""The application builder KubeRay's RayService runs (`serveConfigV2`):

    applications:
      - name: pdserve
        import_path: pdserve.deployments.rayservice:build
        args: {config: /etc/pdserve/cluster.yaml}
        external_scaler_enabled: true   # when the config has an autoscaling section

Serve calls `build(args)` on the head; the same config file, checks and builder as
`pdserve serve` apply, so a config that fails there fails here with the same message.
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from pdserve.config.cluster import load_config
from pdserve.deployments.app import build_app
from pdserve.deployments.service import with_secret
from pdserve.model_store import resolve_model


def build(args: dict[str, Any]) -> Application:
    """`args["config"]`: the cluster YAML's path. The KV secret comes from the config or from
    PDSERVE_KV_SECRET (the chart sets it from a Secret), never from `args`, which Serve
    shows in its status."""
    if "config" not in args:
        raise ValueError("pdserve.deployments.rayservice:build needs args {config: <path of the cluster YAML>}")
    cfg = with_secret(load_config(args["config"]))
    model_path = str(resolve_model(None if cfg.model == "default" else cfg.model))
    return build_app(cfg, model_path)
