"""Streaming an answer out of an engine replica: what the decode and the colocated replicas
both do once the prompt's KV is in place (received, or computed by the engine itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from opentelemetry import trace

from pdserve import telemetry
from pdserve.errors import EngineFailure, KVLost
from pdserve.kvtransfer import params
from pdserve.prefill.engine import EngineServer
from pdserve.prefill.logprobs import token_logprobs
from pdserve.prefill.requests import GenerateChunk, GenerateRequest


async def stream_answer(server: EngineServer, req: GenerateRequest, max_tokens: int,
                        kv: dict | None) -> AsyncIterator[GenerateChunk]:
    """Run `req` on `server`'s engine and yield its tokens as they come. `kv` is the connector's
    request params when the prompt's KV arrives from a prefill replica; None: the engine prefills."""
    n_prompt = len(req.prompt_token_ids)
    sp = server.sampling_params(req.sampling, max_tokens, kv, req.sampled_tokens)
    completion = 0
    attrs = {"pdserve.pool": server.role, "pdserve.local_prefill": kv is None}
    with server.serving("decode", req, attrs, prefills=kv is None) as (span, progress):
        async for out in server.engine.generate({"prompt_token_ids": req.prompt_token_ids}, sp, req.request_id):
            o = out.outputs[0]
            progress.output(len(o.token_ids))
            completion += len(o.token_ids)
            chunk = GenerateChunk(o.text, list(o.token_ids), n_prompt, completion,
                                  logprobs=token_logprobs(o.token_ids, o.logprobs, req.sampling.logprobs))
            if kv is None and completion == len(o.token_ids):  # the prefill was this engine's: the first output
                chunk.cached_tokens = out.num_cached_tokens
            if out.finished:
                if o.finish_reason not in ("stop", "length") and kv is not None and completion == 0:
                    raise KVLost(req.request_id)  # vLLM's kv_load_failure_policy "fail": nothing generated
                if o.finish_reason not in ("stop", "length"):
                    raise EngineFailure(f"generation of {req.request_id} ended with {o.finish_reason}")
                chunk.finish_reason = o.finish_reason
                chunk.kv_transfer = _kv_report(out.kv_transfer_params, span)
            yield chunk
        span.set_attribute("pdserve.completion_tokens", completion)


def _kv_report(kv_params: dict | None, decode_span: Any) -> dict | None:
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
