"""The OpenAI-compatible HTTP API: a FastAPI app that translates OpenAI's wire format
to and from `FrontendAPI` calls.

The app holds no serving state: `get_frontend` is called per request, because the
frontend is created later, by the Ray Serve ingress replica that wraps this app. Every
failure reads as OpenAI's error body, so OpenAI clients raise their usual exceptions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.deployments.api.answer_shapes import ChatShapes, CompletionShapes, Shapes
from pdserve.deployments.api.choices import chain, merged, until_each_began
from pdserve.deployments.api.front_door import FrontDoor
from pdserve.deployments.api.openai_answers import (
    ChatCompletion,
    Completion,
    ErrorDetail,
    ErrorResponse,
    KVTransferUsage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SLOUsage,
    Usage,
    error_docs,
)
from pdserve.deployments.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    invalid_request,
)
from pdserve.deployments.api.tokenize_api import add_tokenize_routes
from pdserve.deployments.frontend import FrontendAPI
from pdserve.deployments.tool_parsing import AutoToolCalls
from pdserve.errors import EngineFailure, InvalidRequest, ServeError
from pdserve.prefill.requests import GenerateChunk, GenerateRequest

logger = logging.getLogger(__name__)

_TRACE_HEADERS = ("traceparent", "tracestate")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = "data: [DONE]\n\n"
# Module level: the route's annotations (strings, with postponed evaluation) resolve here.
_BEARER = HTTPBearer(auto_error=False, description="One of the service's API keys, when it has any")


def build_http_app(get_frontend: Callable[[], FrontendAPI]) -> FastAPI:
    """The OpenAI API app; `get_frontend()` returns the replica's frontend when a request arrives."""
    app = FastAPI(title="pdserve", summary="OpenAI-compatible API of pdserve", version="0.1.0")
    _add_error_handlers(app)
    app.add_middleware(FrontDoor, get_frontend=get_frontend)  # the key and the body's size, before the body
    started_s = int(time.time())
    keyed = [Depends(_BEARER)]  # checked by FrontDoor; named here so that the OpenAPI document shows the scheme

    @app.post("/v1/chat/completions", response_model=None, responses=_docs(ChatCompletion), dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        frontend = get_frontend()
        frontend.check_model(body.model)
        sampling = body.sampling()
        session = body.session(request.headers)
        auto = _auto_tool_calls(frontend, body)
        if auto is not None:
            sampling = auto.sampling(sampling)
        req = await frontend.chat_request(body.message_dicts(), sampling, _trace_carrier(request),
                                          body.objectives(request.headers), tools=body.tool_dicts())
        req.session_id = session
        shapes = ChatShapes(f"chatcmpl-{req.request_id}", int(time.time()), frontend.model_name,
                            forced=body.tool_plan[0], auto=auto, prompt_token_ids=req.prompt_token_ids)
        return await _answer(frontend, req, body, shapes)

    @app.post("/v1/completions", response_model=None, responses=_docs(Completion), dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        frontend = get_frontend()
        frontend.check_model(body.model)
        session = body.session(request.headers)
        req = await frontend.completion_request(body.prompt_input(), body.sampling(), _trace_carrier(request),
                                                body.objectives(request.headers))
        req.session_id = session
        prompt = body.prompt_input()
        echoed = "" if not body.echo else prompt if isinstance(prompt, str) else await frontend.detokenize(prompt)
        shapes = CompletionShapes(f"cmpl-{req.request_id}", int(time.time()), frontend.model_name, echo=echoed)
        return await _answer(frontend, req, body, shapes)

    add_tokenize_routes(app, get_frontend, keyed)

    @app.get("/v1/models", dependencies=keyed, responses=error_docs(only=(401,)))
    async def models() -> ModelList:
        frontend = get_frontend()
        return ModelList(data=[ModelCard(id=frontend.model_name, created=started_s,
                                         max_model_len=frontend.max_model_len)])

    @app.get("/health", responses={503: {"description": "Some pool has no live instance"}})
    async def health() -> JSONResponse:
        body = await get_frontend().health()
        return JSONResponse(body, status_code=200 if body.get("status") == "ok" else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        content, content_type = await get_frontend().metrics_text()
        return Response(content, media_type=content_type)

    return app


def _docs(body: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI answers of a generation route: the JSON body, SSE when streaming, OpenAI's errors
    (listing "default" also keeps FastAPI from documenting a 422 this API never sends)."""
    stream = {"text/event-stream": {"schema": {"type": "string", "description": "stream=true: `data: <chunk JSON>` "
                                               "events, then `data: [DONE]`"}}}
    errors = error_docs((429, "Overloaded: retry later"), (503, "No instance available"),
                        ("default", "Engine failure or other server error"))
    return {200: {"model": body, "content": stream}, **errors}


def _auto_tool_calls(frontend: FrontendAPI, body: ChatCompletionRequest) -> AutoToolCalls | None:
    """How a request whose model decides on tool calls is read; None for any other request.
    InvalidRequest when the service has no tool-call parser to read them with."""
    if not body.auto_tools:
        return None
    if frontend.tool_parsing is None:
        raise InvalidRequest("tool_choice 'auto' (OpenAI's default when tools are given) needs the model family's "
                             "tool-call parser, and this service has none (`tool_call_parser` in its config); send "
                             "tool_choice 'required', a named function, or 'none'", param="tool_choice")
    return frontend.tool_parsing.for_request(body.vllm_auto_tools_request())


def _trace_carrier(request: Request) -> dict[str, str]:
    """The client's W3C trace context, so the request's spans join the client's trace."""
    return {name: value for name in _TRACE_HEADERS if (value := request.headers.get(name)) is not None}


async def _answer(frontend: FrontendAPI, req: GenerateRequest, body: GenerationRequest, shapes: Shapes) -> Response:
    """Wait for every choice's first chunk before answering, so that a request that cannot be
    routed (Overloaded, Unavailable) gets its own status code even when it asked for a stream.
    Each of `n` choices is a request of its own (`GenerateRequest.choice`)."""
    reqs = [req] if body.n == 1 else [req.choice(i) for i in range(body.n)]
    shaped = [dataclasses.replace(shapes, index=i) for i in range(len(reqs))]
    chunks = merged([frontend.stream(r) for r in reqs])
    try:
        opening = await until_each_began(chunks, len(reqs))
        if body.stream:
            return StreamingResponse(_events(chain(opening, chunks), shaped, body), media_type="text/event-stream",
                                     headers=_SSE_HEADERS)
        answers: list[list[GenerateChunk]] = [[] for _ in reqs]
        async for i, chunk in chain(opening, chunks):
            answers[i].append(chunk)
    except BaseException:
        await chunks.aclose()
        raise
    asked = req.sampling.logprobs is not None
    choices = [sh.choice("".join(c.text for c in answer), [t for c in answer for t in c.token_ids],
                         _finish_reason(answer[-1]), [t for c in answer for t in c.logprobs or []] if asked else None)
               for sh, answer in zip(shaped, answers, strict=True)]
    lasts = [answer[-1] for answer in answers]
    whole = shapes.whole(choices, _usage(lasts))
    return Response(whole.model_dump_json(), media_type="application/json", headers=_slo_headers(_slowest(lasts)))


async def _events(chunks: AsyncGenerator[tuple[int, GenerateChunk], None], shaped: list[Shapes],
                  body: GenerationRequest) -> AsyncIterator[str]:
    """SSE events of a streamed answer. Once the response has started, its status can no longer
    change, so a failure becomes a last `{"error": ...}` event before `[DONE]`."""
    try:
        for shapes in shaped:
            for event in shapes.opening():
                yield _event(event.model_dump_json())
        lasts: dict[int, GenerateChunk] = {}
        async for i, chunk in chunks:
            lasts[i] = chunk
            if chunk.text or chunk.finish_reason or chunk.logprobs:
                so_far = _token_counts(chunk) if body.continuous_usage else None
                delta = shaped[i].delta(chunk, so_far)
                if delta is not None:
                    yield _event(delta.model_dump_json())
        for last in lasts.values():
            _finish_reason(last)
        if body.include_usage:
            yield _event(shaped[0].usage(_usage(list(lasts.values()))).model_dump_json())
    except ServeError as err:
        yield _event(json.dumps(err.openai_body()))
    except Exception as exc:
        logger.exception("request %s failed mid-stream", shaped[0].id)
        yield _event(json.dumps(_internal_error(exc).openai_body()))
    finally:
        await chunks.aclose()
    yield _DONE


def _event(data: str) -> str:
    return f"data: {data}\n\n"


def _token_counts(chunk: GenerateChunk) -> Usage:
    """The tokens of the answer so far, as a chunk's usage (`continuous_usage_stats`)."""
    return Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                 total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


def _usage(lasts: list[GenerateChunk]) -> Usage:
    """The request's usage from each choice's last chunk: the prompt counted once, as in vLLM;
    the objectives as the slowest choice met them; a KV transfer's report when there is one choice."""
    completion = sum(last.completion_tokens for last in lasts)
    slowest = _slowest(lasts)
    slo = SLOUsage(**slowest.slo.as_dict()) if slowest.slo else None
    kv = KVTransferUsage.from_report(lasts[0].kv_transfer) if len(lasts) == 1 and lasts[0].kv_transfer else None
    cached = lasts[0].cached_tokens
    return Usage(prompt_tokens=lasts[0].prompt_tokens, completion_tokens=completion,
                 total_tokens=lasts[0].prompt_tokens + completion, slo=slo, kv_transfer=kv,
                 prompt_tokens_details=None if cached is None else PromptTokensDetails(cached_tokens=cached))


def _slowest(lasts: list[GenerateChunk]) -> GenerateChunk:
    """The choice whose SLO report speaks for the request: the first to miss an objective, else
    the one with the longest TTFT."""
    reported = [last for last in lasts if last.slo is not None]
    if not reported:
        return lasts[0]
    return max(reported, key=lambda last: (not (last.slo.ttft_met and last.slo.tpot_met), last.slo.ttft_ms))


def _slo_headers(last: GenerateChunk) -> dict[str, str]:
    """A whole answer's measured TTFT/TPOT and whether each met its objective. (A stream's
    headers leave before its answer exists: it reports them in its usage chunk.)"""
    if last.slo is None:
        return {}
    r = last.slo
    headers = {"x-pdserve-ttft-ms": f"{r.ttft_ms:.1f}", "x-pdserve-ttft-met": str(r.ttft_met).lower(),
               "x-pdserve-tpot-met": str(r.tpot_met).lower()}
    if r.tpot_ms is not None:
        headers["x-pdserve-tpot-ms"] = f"{r.tpot_ms:.1f}"
    return headers


def _finish_reason(last: GenerateChunk) -> str:
    """The answer's finish reason; an answer without one was cut short, which a client must not
    mistake for a complete one."""
    if last.finish_reason is None:
        raise EngineFailure("The engine ended the answer without a finish reason")
    return last.finish_reason


def _internal_error(exc: Exception) -> ServeError:
    """A bug or an unexpected failure: name its class only, since its message may hold internals."""
    return ServeError(f"Internal server error ({type(exc).__name__})")


def _error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.openai_body(), status_code=err.http_status, headers=err.headers())


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every failure with OpenAI's error body; invalid bodies are 400, as in OpenAI's API."""

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_invalid_body(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        body = ErrorResponse(error=ErrorDetail(message=message, type="invalid_request_error"))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises `exc` after sending this answer, so the server still logs the traceback.
        return _error_response(_internal_error(exc))


def _invalid_body(exc: RequestValidationError) -> InvalidRequest:
    """FastAPI's validation errors, with locations relative to the body (`messages[0].role`)."""
    errors = list(exc.errors())
    first = errors[0] if errors else None
    if first and first["type"] == "json_invalid":
        return InvalidRequest(f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    if first and tuple(first["loc"]) == ("body",) and isinstance(first.get("input"), bytes):
        return InvalidRequest("The request body must be JSON, sent with 'Content-Type: application/json'")
    return invalid_request([{**e, "loc": tuple(e["loc"])[1:]} for e in errors])  # type: ignore[typeddict-item]
