"""The ingress deployment: the OpenAI HTTP API (through Ray Serve's proxy, and from its own
server in the replica) and the gRPC API (its own server), all over one `Frontend`."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from pdserve import telemetry
from pdserve.config.cluster import ClusterConfig
from pdserve.deployments.api.direct_http import start_direct_http
from pdserve.deployments.api.grpc_api import GrpcHealth, server_credentials, start_grpc_server
from pdserve.deployments.api.http_api import build_http_app
from pdserve.deployments.api.openai_models import load_validators
from pdserve.deployments.frontend import Frontend
from pdserve.errors import Unavailable

log = logging.getLogger("pdserve.ingress")

# One ingress replica per process: the HTTP routes reach its frontend through here.
_frontend: Frontend | None = None


def _current_frontend() -> Frontend:
    if _frontend is None:
        raise Unavailable("the ingress is still starting")
    return _frontend


_http_app = build_http_app(_current_frontend)


@serve.ingress(_http_app)
class Ingress:
    async def __init__(self, cfg: ClusterConfig, model_path: str, controller: Any, pools: dict[str, Any]):
        global _frontend
        telemetry.setup_tracing(cfg.tracing, "ingress")
        telemetry.setup_logging(cfg.log_level)
        self.frontend = Frontend(cfg, model_path, controller, pools, serve.get_replica_context().replica_id.unique_id)
        load_validators()
        await self.frontend.start_polling()
        self.frontend.routes.open_soon()
        _frontend = self.frontend
        self.grpc_health = GrpcHealth()
        tls = server_credentials(cfg.ingress)
        self.grpc = await start_grpc_server(_current_frontend, cfg.ingress.grpc_port, cfg.ingress.host,
                                            self.grpc_health, tls)
        ing = cfg.ingress
        self.http = None
        if ing.direct_http_port is not None:
            self.http = await start_direct_http(_http_app, ing.host, ing.direct_http_port,
                                                ing.route_prefix.rstrip("/"))
        log.info("ingress ready: model %s, gRPC on %s:%d (%s), HTTP on %s", self.frontend.model_name, ing.host,
                 ing.grpc_port, "plaintext" if tls is None else "TLS",
                 "Serve's proxy only" if self.http is None else f"{self.http.address} and Serve's proxy")

    def finished_spans(self) -> list[dict]:
        return telemetry.finished_spans()

    async def __del__(self) -> None:
        await self.grpc_health.set_serving(False)  # probes move traffic away while streams finish
        if self.http is not None:
            await self.http.stop()
        await self.grpc.stop(grace=5)
        await self.frontend.routes.close()
        telemetry.shutdown_tracing()
        await super().__del__()
