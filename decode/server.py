"""The decode pool's deployment: loads a request's prompt KV from the prefill replica
(over its KV receiver) and streams the generated tokens. The colocated pool runs the
same server without a connector: it prefills and decodes by itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from opentelemetry import trace

from pdserve.deployments import telemetry
from pdserve.deployments.engine_process import free_port
from pdserve.deployments.engine_server import EngineServer
from pdserve.deployments.errors import EngineFailure
from pdserve.deployments.requests import GenerateChunk, GenerateRequest
from pdserve.kvtransfer import params


class DecodeServer(EngineServer):
    role = "decode"

    async def __init__(self, cfg: Any, model_path: str, controller: Any):
        import ray

        ip = ray.util.get_node_ip_address()
        await super().__init__(cfg, model_path, controller, f"{ip}:{free_port(ip)}")

    async def generate(
        self, req: GenerateRequest, max_tokens: int, lease_ms: int, *, replica_id: str, local_prefill: bool = False
    ) -> AsyncIterator[GenerateChunk]:
        """Stream the answer. In the decode pool the prompt's KV arrives from a prefill replica
        under the request id, unless the controller chose `local_prefill` (a short prompt this
        engine prefills faster than a transfer would take). `replica_id` is read by the router."""
        n_prompt = len(req.prompt_token_ids)
        remote_kv = self.role == "decode" and not local_prefill
        kv = params.for_decode(req.request_id, lease_ms) if remote_kv else None
        sp = self.sampling_params(req.sampling, max_tokens, kv)
        completion = 0
        attrs = {"pdserve.pool": self.role, "pdserve.local_prefill": not remote_kv}
        with self.serving("decode", req, attrs, prefills=not remote_kv) as (span, progress):
            async for out in self.engine.generate({"prompt_token_ids": req.prompt_token_ids}, sp, req.request_id):
                o = out.outputs[0]
                progress.output(len(o.token_ids))
                completion += len(o.token_ids)
                chunk = GenerateChunk(o.text, list(o.token_ids), n_prompt, completion)
                if out.finished:
                    if o.finish_reason not in ("stop", "length"):
                        raise EngineFailure(f"generation of {req.request_id} ended with {o.finish_reason}")
                    chunk.finish_reason = o.finish_reason
                    chunk.kv_transfer = self._kv_report(out.kv_transfer_params, span)
                yield chunk
            span.set_attribute("pdserve.completion_tokens", completion)

    def _kv_report(self, kv_params: dict | None, decode_span: Any) -> dict | None:
        """The transfer's outcome; also records it as the trace's KV-transfer span, parented
        to the prefill span whose context travelled inside the transfer."""
        if not kv_params:
            return None
        report = {k: v for k, v in kv_params.get(params.KEY, {}).items() if k != "op"}
        start, end = report.get("start_unix_ns") or 0, report.get("ready_unix_ns") or 0
        if start and end:
            tp = report.get("trace_parent")
            parent = telemetry.extract({"traceparent": tp}) if tp else trace.set_span_in_context(decode_span)
            span = telemetry.tracer().start_span(
                "kv_transfer", context=parent, start_time=start,
                attributes={"pdserve.kv_state": str(report.get("state")), "pdserve.kv_bytes": int(report.get("bytes", 0)),
                            "pdserve.kv_exposed_ms": float(report.get("exposed_ms", 0.0))},
            )
            span.end(end_time=end)
        return report


class ColocatedServer(DecodeServer):
    """A plain engine doing both phases (vLLM's chunked prefill)."""

    role = "colocated"

    async def __init__(self, cfg: Any, model_path: str, controller: Any):
        await EngineServer.__init__(self, cfg, model_path, controller)
