"""The `KVTransferConfig` that plugs `GrpcKVConnector` into a vLLM engine: one place for
every engine builder (the Serve replicas and the local engine processes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig

CONNECTOR = "GrpcKVConnector"
CONNECTOR_MODULE = "pdserve.kvtransfer.connector"


_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer", "adaptive": "kv_both"}


def kv_transfer_config(role: Literal["prefill", "decode", "adaptive"], settings: dict[str, Any],
                       load_failure_policy: Literal["recompute", "fail"] = "fail") -> KVTransferConfig:
    """`settings` are `KVTransferSettings` fields as JSON (the secret in the clear: the connector
    runs in the engine's own processes). A prefill engine produces KV, a decode engine consumes it,
    an adaptive engine does either per request (its `kv_transfer_params` say which);
    "fail" (vLLM's default) ends a request whose KV did not arrive, "recompute" prefills it again."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector=CONNECTOR,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role=_ROLES[role],
        kv_connector_extra_config=settings,
        kv_load_failure_policy=load_failure_policy,
    )
