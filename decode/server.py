"""The decode pool's deployment: loads a request's prompt KV from the prefill replica
(over its KV receiver) and streams the generated tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pdserve.decode.stream import stream_answer
from pdserve.kvtransfer import params
from pdserve.ports import first_free_port, free_port
from pdserve.prefill.engine import EngineServer
from pdserve.prefill.requests import GenerateChunk, GenerateRequest


class DecodeServer(EngineServer):
    role = "decode"

    async def __init__(self, cfg: Any, model_path: str, controller: Any):
        import ray
        from ray import serve

        ip = ray.util.get_node_ip_address()
        ranks = cfg.pools()[serve.get_replica_context().deployment].tp_size  # rank r's receiver: port + r
        if cfg.kv_receiver_port:
            port = first_free_port(ip, cfg.kv_receiver_port, cfg.kv_receiver_port_count, ranks)
        else:
            port = free_port(ip, count=ranks)
        await super().__init__(cfg, model_path, controller, f"{ip}:{port}")

    async def generate(
        self, req: GenerateRequest, max_tokens: int, lease_ms: int, *, replica_id: str, local_prefill: bool = False,
        skip_tokens: int = 0, src_tp: int = 1,
    ) -> AsyncIterator[GenerateChunk]:
        """Stream the answer. The prompt's KV arrives from a prefill replica of `src_tp` tensor-parallel
        ranks (a part from each) under the request id, all of it but the last token (the first of
        the answer, which the prefill engine sampled) and but the `skip_tokens` this engine's prefix
        cache was expected to hold, unless the controller chose `local_prefill` (a short prompt this
        engine prefills faster than a transfer would take). `replica_id` is read by the router."""
        kv = None if local_prefill else params.for_decode(req.request_id, lease_ms, len(req.prompt_token_ids) - 1,
                                                          skip_tokens, src_tp)
        async for chunk in stream_answer(self, req, max_tokens, kv):
            yield chunk

    async def discard_kv(self, transfer_id: str, src_tp: int = 1, *, replica_id: str) -> None:
        """Free the prompt KV of an answer that ended at the prefill engine's first token (every part
        of it, from a prefill engine of `src_tp` ranks)."""
        await self.engine.collective_rpc("pdserve_discard_kv_transfer", args=(transfer_id, src_tp))
