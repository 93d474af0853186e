"""The colocated pool's deployment: a plain engine (no connector) that prefills and decodes
each request itself with vLLM's chunked prefill; the baseline and a fallback."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pdserve.decode.stream import stream_answer
from pdserve.prefill.engine import EngineServer
from pdserve.prefill.requests import GenerateChunk, GenerateRequest


class ColocatedServer(EngineServer):
    role = "colocated"

    async def generate(
        self, req: GenerateRequest, max_tokens: int, lease_ms: int, *, replica_id: str, local_prefill: bool = False
    ) -> AsyncIterator[GenerateChunk]:
        """Stream the answer; the same call as the decode pool's, so the ingress serves both
        alike. `lease_ms` and `local_prefill` have nothing to say here (no KV moves)."""
        async for chunk in stream_answer(self, req, max_tokens, None):
            yield chunk
