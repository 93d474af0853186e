"""Fakes of the engine-backed frontend for the HTTP API's own tests (no tokenizer, no engine):
they refuse every request, route none, answer with fixed chunks, or fail outright. Answers with
generated text are covered by the end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.deployments.api.http_api import build_http_app
from pdserve.errors import InvalidRequest, ModelNotFound, Overloaded
from pdserve.prefill.requests import SLO, GenerateChunk, GenerateRequest, Objectives, Sampling, SLOReport, TokenLogprob

MODEL = "served-model"
HI = [{"role": "user", "content": "hi"}]


class FakeRejectingFrontend:
    """A fake of the engine-backed frontend for the HTTP layer's own tests: checks the model
    name, then rejects every prompt (as the real one does for a prompt beyond the context)
    and records what it was handed. It never produces text; generation is tested end to
    end against real engines (test_service_e2e.py)."""

    model_name = MODEL
    max_model_len = 2048
    max_body_bytes = 64 << 10
    tool_parsing = None

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.keys_seen: list[str | None] = []
        self.registry = CollectorRegistry()
        Counter("pdserve_test_requests", "requests seen", registry=self.registry).inc()

    def authorize(self, api_key: str | None) -> None:
        self.keys_seen.append(api_key)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFound(model, self.model_name)

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        self.calls.append({"messages": messages, "sampling": sampling, "trace_carrier": trace_carrier, "tools": tools,
                           "objectives": objectives})
        raise InvalidRequest("the prompt does not fit the context", param="messages", code="context_length_exceeded")

    async def completion_request(self, prompt: str | list[int], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None,
                     objectives: Objectives | None = None) -> GenerateRequest:
        self.calls.append({"prompt": prompt, "sampling": sampling, "trace_carrier": trace_carrier,
                           "objectives": objectives})
        raise InvalidRequest("the prompt does not fit the context", param="prompt", code="context_length_exceeded")

    async def health(self) -> dict:
        return {"status": "unavailable", "prefill": 0, "decode": 0}

    async def metrics_text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class FakeNoCapacityFrontend(FakeRejectingFrontend):
    """Accepts requests but routes none, like a cluster at capacity: no text is ever generated."""

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        return GenerateRequest("0" * 32, [], sampling, SLO(1000, 100, 0), trace_carrier or {})

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        raise Overloaded("every decode instance is at its limit", retry_after_s=2.6)
        yield  # an async generator, like the real frontend's stream


# The decode replica's report of a transfer, as its connector returns it.
KV_REPORT = {"transfer_id": "t1", "state": "DONE", "tokens": 3, "bytes": 9216, "error": "", "prefill_compute_ms": 9.0,
             "exposed_ms": 4.25, "load_ms": 1.5, "trace_parent": "", "start_unix_ns": 1_000_000_000,
             "ready_unix_ns": 1_012_500_000}


class FakeAnsweringFrontend(FakeRejectingFrontend):
    """Answers every chat with two fixed chunks, the last with an SLO report: the HTTP layer's
    wire format of an answer, without an engine."""

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None, objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        return GenerateRequest("0" * 32, [1, 2, 3], sampling, SLO(500, 50, 0), trace_carrier or {})

    completion_request = chat_request

    async def detokenize(self, token_ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in token_ids)

    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        asked = req.sampling.logprobs is not None
        yield GenerateChunk("Hel", [10], 3, 1, logprobs=[TokenLogprob("Hel", -0.5, [("Hel", -0.5), ("Hi", -1.25)])]
                            if asked else None)
        yield GenerateChunk("lo", [11], 3, 2, "stop", slo=SLOReport(612.5, 30.0, SLO(500.0, 50.0, 0)),
                            kv_transfer=KV_REPORT,
                            logprobs=[TokenLogprob("lo", -9999.0, [("p", -0.01), ("lo", -9999.0)])] if asked else None)


class FakeBrokenFrontend(FakeRejectingFrontend):
    def check_model(self, model: str) -> None:
        raise RuntimeError("connection to 10.0.0.7 refused, token=s3cret")


def http_client(frontend: FakeRejectingFrontend) -> TestClient:
    """The HTTP API app over `frontend`; a server-side exception is its 500 answer, not raised here."""
    return TestClient(build_http_app(lambda: frontend), raise_server_exceptions=False)


def assert_openai_error(body: dict, *, type_: str, param: str | None) -> str:
    """`body` is OpenAI's error body of `type_` naming `param`; returns its message."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["param"] == param
    return body["error"]["message"]


def sse_events(resp: Any) -> list[dict]:
    """The JSON events of a streamed answer (not `[DONE]`)."""
    return [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
