"""The prefill pool's deployment: runs a prompt once and pushes its KV to the decode
replica the controller chose, layer by layer, through `GrpcKVConnector`."""

from __future__ import annotations

import time

from pdserve import telemetry
from pdserve.errors import EngineFailure
from pdserve.kvtransfer import params
from pdserve.prefill.engine import EngineServer
from pdserve.prefill.requests import GenerateRequest


class PrefillServer(EngineServer):
    role = "prefill"

    async def prefill(self, req: GenerateRequest, dest: str, lease_ms: int, *, replica_id: str) -> dict:
        """Compute the prompt's KV and push it to `dest`; returns prefill timings.
        `replica_id` is read by the router (see exact_router) and names this replica."""
        attrs = {"pdserve.prompt_tokens": len(req.prompt_token_ids), "pdserve.kv_dest": dest}
        with self.serving("prefill", req, attrs, prefills=True) as (span, progress):
            kv = params.for_prefill(req.request_id, dest, lease_ms, telemetry.inject(span).get("traceparent", ""))
            greedy = req.sampling.model_copy(update={"temperature": 0.0, "stop": [], "seed": None})
            sp = self.sampling_params(greedy, 1, kv)
            start = time.perf_counter()
            final = None
            async for out in self.engine.generate({"prompt_token_ids": req.prompt_token_ids}, sp, f"{req.request_id}-p"):
                progress.output(len(out.outputs[0].token_ids))
                final = out
            if final is None or final.outputs[0].finish_reason not in ("stop", "length"):
                reason = final.outputs[0].finish_reason if final is not None else "no output"
                raise EngineFailure(f"prefill of {req.request_id} ended with {reason}")
            prefill_ms = (time.perf_counter() - start) * 1e3
            span.set_attribute("pdserve.prefill_ms", prefill_ms)
            return {"prefill_ms": prefill_ms, "kv_transfer": final.kv_transfer_params}
