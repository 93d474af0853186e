"""The prefill pool's deployment: runs a prompt once, pushes its KV to the decode replica the
controller chose, layer by layer, through `GrpcKVConnector`, and samples the answer's first
token with the request's own sampling, so that the client has it as soon as the prompt is done."""

from __future__ import annotations

import time

from pdserve import telemetry
from pdserve.errors import EngineFailure
from pdserve.kvtransfer import params
from pdserve.prefill.engine import EngineServer
from pdserve.prefill.logprobs import token_logprobs
from pdserve.prefill.requests import GenerateRequest


class PrefillServer(EngineServer):
    role = "prefill"

    async def prefill(self, req: GenerateRequest, dest: str | None, lease_ms: int, skip_tokens: int = 0,
                      dest_tp: int = 1, *, replica_id: str) -> dict:
        """Compute the prompt's KV, push it to `dest` (None: no engine goes on from here, the
        answer is one token long; with `dest_tp` ranks there, each rank's share of the heads to the
        rank's receiver) but for the whole blocks of the first `skip_tokens`, which `dest`
        is expected to hold in its prefix cache, and sample the first token. Returns its `token_ids` and `text`,
        vLLM's `finish_reason` ("stop": the answer ended there; "length": it may go on), its KV transfer's
        report (and the first token's `logprobs` when asked for); the prefill's own time goes on its span
        (the controller learns it as the ingress saw it: `deployments/disaggregated._timed`). `replica_id` is read by the router (see exact_router) and names this replica."""
        attrs = {"pdserve.prompt_tokens": len(req.prompt_token_ids), "pdserve.kv_dest": dest or ""}
        with self.serving("prefill", req, attrs, prefills=True) as (span, progress):
            kv = params.for_prefill(req.request_id, dest, lease_ms, telemetry.inject(span).get("traceparent", ""),
                                    skip_tokens, dest_tp) if dest else None
            sp = self.sampling_params(req.sampling, 1, kv, req.sampled_tokens)
            start = time.perf_counter()
            final, token_ids, text, logprobs = None, [], "", []
            async for out in self.engine.generate({"prompt_token_ids": req.prompt_token_ids}, sp, f"{req.request_id}-p"):
                o = out.outputs[0]
                progress.output(len(o.token_ids))
                token_ids += o.token_ids
                text += o.text
                logprobs += token_logprobs(o.token_ids, o.logprobs, req.sampling.logprobs) or []
                final = out
            if final is None or final.outputs[0].finish_reason not in ("stop", "length"):
                reason = final.outputs[0].finish_reason if final is not None else "no output"
                raise EngineFailure(f"prefill of {req.request_id} ended with {reason}")
            prefill_ms = (time.perf_counter() - start) * 1e3
            span.set_attribute("pdserve.prefill_ms", prefill_ms)
            return {"kv_transfer": final.kv_transfer_params, "token_ids": token_ids,
                    "text": text, "finish_reason": final.outputs[0].finish_reason,
                    "cached_tokens": final.num_cached_tokens,
                    "logprobs": logprobs if req.sampling.logprobs is not None else None}
