"""Ray Serve actuator: sets the prefill and decode deployments' replica counts through
Serve's external-scaler API (the application is deployed with `external_scaler_enabled`).

On KubeRay with in-tree autoscaling, replicas that do not fit on the running nodes stay
pending and the autoscaler turns their resource demand into pods of the right worker
group; nothing else is needed there.
"""

from __future__ import annotations

import logging

from pdserve.controller.autoscaling.actuator import Actuator

log = logging.getLogger("pdserve.autoscale")


class ServeActuator(Actuator):
    """Talks to Serve's own controller actor, as Serve's REST scale endpoint does, so it
    works from any process of the Ray cluster (the pdserve controller replica, a test)."""

    def __init__(self, app_name: str, deployments: dict[str, str] | None = None):
        self.app_name = app_name
        self.deployments = deployments or {"prefill": "prefill", "decode": "decode"}
        """Serve deployment name per pool."""

    def _controller(self):
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)

    def current(self) -> dict[str, int]:
        import ray

        details = ray.get(self._controller().get_serve_instance_details.remote())
        app = details.get("applications", {}).get(self.app_name)
        if app is None:
            raise RuntimeError(f"Serve application {self.app_name!r} is not running")
        out = {}
        for pool, name in self.deployments.items():
            if name not in app["deployments"]:
                raise RuntimeError(f"Serve application {self.app_name!r} has no deployment {name!r}")
            out[pool] = int(app["deployments"][name]["target_num_replicas"])
        return out

    def apply(self, replicas: dict[str, int]) -> None:
        import ray
        from ray.serve._private.common import DeploymentID

        controller = self._controller()
        for pool, n in replicas.items():
            name = self.deployments[pool]
            ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=name, app_name=self.app_name), n))
            log.info("serve: %s/%s target %d replicas", self.app_name, name, n)
