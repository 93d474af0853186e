"""The OpenAI HTTP API fuzzed against its own OpenAPI document (schemathesis): every operation,
with generated valid and invalid requests, answers without a server error and as documented.

The ingress is the real `Frontend`, with the default model's tokenizer and its validation; only
the controller and the engine pools, its remote peers, are fakes."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pdserve.config.cluster import parse_config
from pdserve.controller.decision import Decision, Outcome, RouteRequest, Target
from pdserve.deployments.api.http_api import build_http_app
from pdserve.deployments.api.openai_answers import ChatCompletionChunk, CompletionChunk, ErrorResponse
from pdserve.deployments.api_keys import ENV_VAR
from pdserve.deployments.frontend import Frontend
from pdserve.model_store import resolve_model
from pdserve.prefill.requests import GenerateChunk, GenerateRequest, Sampling
from tests.deployments.fake_serve_handles import FakeEngineStream, FakeRemoteMethod

pytestmark = pytest.mark.slow  # needs the default model's checkpoint (make model), as test_frontend.py does

API_KEY = "fuzz-test-key"
EXAMPLES_PER_OPERATION = 60
STREAM_CHUNKS = {"/v1/chat/completions": ChatCompletionChunk, "/v1/completions": CompletionChunk}


def _is_event_stream(response: schemathesis.Response) -> bool:
    return any(value.startswith("text/event-stream") for value in response.headers.get("content-type", []))


def response_schema_conformance_of_json(ctx: CheckContext, response: schemathesis.Response,
                                        case: schemathesis.Case) -> bool | None:
    """schemathesis's body check, except on event streams. For an Open API 3.1 document it reads the
    `text/event-stream` schema as the schema of each event (an object with `data`, `event`, ...), while
    this API documents the stream as a string: every streamed answer would fail. The streamed events
    are checked by `streamed_events_are_chunks_then_done` instead."""
    if _is_event_stream(response):
        return None
    return response_schema_conformance(ctx, response, case)


def streamed_events_are_chunks_then_done(ctx: CheckContext, response: schemathesis.Response,
                                         case: schemathesis.Case) -> bool | None:
    """Each event of a streamed answer is a chunk of the operation's stream model (or, last, an
    OpenAI error body), and the stream ends with `data: [DONE]`."""
    if not _is_event_stream(response):
        return None
    events = [block for block in response.text.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events), events
    data = [event.removeprefix("data: ") for event in events]
    assert data and data[-1] == "[DONE]", data[-3:]
    for payload in data[:-1]:
        model = ErrorResponse if payload.startswith('{"error"') else STREAM_CHUNKS[case.path]
        model.model_validate_json(payload, strict=True)
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance_of_json, streamed_events_are_chunks_then_done, negative_data_rejection,
          ignored_auth]
"""schemathesis's checks that apply to a stateless API, and the stream check. Left out:
`positive_data_acceptance`, since a body the schema admits may still be refused (an unknown model,
a prompt beyond the context, a temperature out of range), and `max_response_time`, a timing threshold."""


class FakeController:
    """The controller's handle: routes every request to one prefill and one decode replica."""

    def __init__(self) -> None:
        self.choose = FakeRemoteMethod(self._choose)
        self.release = FakeRemoteMethod(lambda *args, **kwargs: None)
        self.prefill_done = FakeRemoteMethod(lambda *args, **kwargs: None)
        self.replica_lost = FakeRemoteMethod(self._nothing)
        self.snapshot = FakeRemoteMethod(self._snapshot)
        self.autoscale_status = FakeRemoteMethod(self._nothing)

    @staticmethod
    async def _choose(route: RouteRequest, resuming: bool = False) -> Decision:
        return Decision(Outcome.ROUTED, prefill=Target("prefill-0", "127.0.0.1:1", 0, "prefill"),
                        decode=Target("decode-0", "127.0.0.1:2", 0, "decode"), reason="fake")

    @staticmethod
    async def _snapshot() -> list[dict]:
        return [{"pool": "prefill", "live": True}, {"pool": "decode", "live": True}]

    @staticmethod
    async def _nothing(*args: Any) -> None:
        return None


def seed_as_vllm_does(sampling: Sampling) -> None:
    """What vLLM's model runner does with a request's seed when it samples (temperature > 0):
    `torch.Generator().manual_seed(seed)` (vllm/v1/worker/gpu_model_runner.py). An exception
    there fails the engine core, not just the request, so the fake engine raises it too."""
    if sampling.seed is not None and sampling.temperature > 0:
        torch.Generator().manual_seed(sampling.seed)


class FakeEnginePool:
    """An engine pool's handle: `prefill` answers the first token; `generate` streams up to three
    one-token chunks, the last with a finish reason and a KV transfer report."""

    def __init__(self) -> None:
        self.prefill = FakeRemoteMethod(self._prefill)
        self.generate = FakeRemoteMethod(self._generate)
        self.discard_kv = FakeRemoteMethod(self._discard_kv)

    def options(self, **_: Any) -> FakeEnginePool:
        return self

    @staticmethod
    async def _prefill(req: GenerateRequest, kv_addr: str | None, lease_ms: int, skip_tokens: int = 0,
                       dest_tp: int = 1, **_: Any) -> dict:
        seed_as_vllm_does(req.sampling)
        return {"kv_transfer": None, "token_ids": [99], "text": " first",
                "finish_reason": "length"}

    @staticmethod
    async def _discard_kv(transfer_id: str, src_tp: int = 1, **_: Any) -> None:
        return None

    @classmethod
    def _generate(cls, req: GenerateRequest, max_tokens: int, lease_ms: int, **_: Any) -> FakeEngineStream:
        return FakeEngineStream(cls._chunks(req, max_tokens))

    @staticmethod
    async def _chunks(req: GenerateRequest, max_tokens: int) -> AsyncIterator[GenerateChunk]:
        seed_as_vllm_does(req.sampling)
        n, prompt = min(max_tokens, 3), len(req.prompt_token_ids)
        for i in range(n - 1):
            yield GenerateChunk(" tok", [100 + i], prompt, i + 1)
        kv = {"state": "DONE", "tokens": prompt, "bytes": 64 * prompt, "exposed_ms": 0.5, "load_ms": 0.25,
              "start_unix_ns": 1_000_000_000, "ready_unix_ns": 1_002_000_000}
        yield GenerateChunk(" end", [100 + n], prompt, n, "length" if n == max_tokens else "stop", kv_transfer=kv)


@functools.cache
def served_frontend() -> Frontend:
    """Built by the first request, so that collecting this module loads no tokenizer."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv(ENV_VAR, raising=False)  # the config's key is the only one
        cfg = parse_config({"ingress": {"api_keys": [API_KEY]}})
        return Frontend(cfg, str(resolve_model(None)), FakeController(),
                        {"prefill": FakeEnginePool(), "decode": FakeEnginePool()})


# Loaded at import, not from a fixture: schemathesis.pytest.from_fixture reads a private pytest
# attribute that pytest 9 no longer has.
schema = schemathesis.openapi.from_asgi("/openapi.json", build_http_app(served_frontend))


@schema.parametrize()
# No deadline and no too_slow health check: both are timing thresholds, which a busy machine trips.
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_every_operation_answers_generated_requests_without_a_server_error_and_as_documented(case):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        # A generated name is nearly never the served one: every request would stop at the 404, short of
        # the prompt's and the sampling options' validation. (An unknown model is tested in test_http_api.py.)
        case.body["model"] = served_frontend().model_name
    case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, checks=CHECKS)


@pytest.mark.parametrize(("seed", "status"), [(2**63 - 1, 200), (-(2**63), 200), (2**64, 400), (-(2**63) - 1, 400)])
def test_a_seed_the_engine_cannot_take_is_refused_before_it_reaches_one(seed: int, status: int) -> None:
    client = TestClient(build_http_app(served_frontend), raise_server_exceptions=False)
    resp = client.post("/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": served_frontend().model_name, "prompt": "Hi", "seed": seed, "temperature": 0.5})
    assert resp.status_code == status, resp.text
    if status == 400:
        assert resp.json()["error"]["param"] == "seed"
