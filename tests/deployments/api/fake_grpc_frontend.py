"""A fake of the engine-backed frontend for the gRPC API's own tests (no tokenizer, no engine)."""

from __future__ import annotations

import uuid

from pdserve.errors import InvalidRequest, ModelNotFound, ServeError, Unavailable
from pdserve.prefill.requests import SLO, GenerateRequest, Objectives, Sampling

MODEL = "test-model"


class FakeValidatingFrontend:
    """A fake of the engine-backed frontend, with no tokenizer and no engines, for the gRPC
    layer's own tests: it checks model names and prompt lengths, and refuses every request that gets as far as
    `stream` with `refusal` (Unavailable, as a frontend with no live instance would)."""

    model_name = MODEL
    max_model_len = 16

    def __init__(self) -> None:
        self.refusal: ServeError = Unavailable("no engine instance is registered")
        self.routed: list[GenerateRequest] = []

    def authorize(self, api_key: str | None) -> None:
        """A service without API keys: every caller is admitted."""

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFound(model, self.model_name)

    async def chat_request(self, messages: list[dict[str, str]], sampling: Sampling,
                     trace_carrier: dict[str, str] | None = None,
                     objectives: Objectives | None = None) -> GenerateRequest:
        raise Unavailable("this frontend has no tokenizer for the chat template")

    async def completion_request(self, prompt: str | list[int], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None,
                     objectives: Objectives | None = None) -> GenerateRequest:
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if isinstance(prompt, str):
            raise Unavailable("this frontend has no tokenizer")
        if len(prompt) + (sampling.max_tokens or 1) > self.max_model_len:
            raise InvalidRequest(f"the prompt does not fit the context of {self.max_model_len} tokens")
        given = objectives or Objectives()
        slo = SLO(given.ttft_ms or 1000.0, given.tpot_ms or 100.0, given.priority or 0)
        return GenerateRequest(uuid.uuid4().hex, list(prompt), sampling, slo, trace_carrier or {})

    async def stream(self, req: GenerateRequest):
        self.routed.append(req)
        raise self.refusal
        yield  # an async generator, as the real stream is
