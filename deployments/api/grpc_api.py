"""The gRPC client API (`pdserve.v1.Generation`): translates proto messages to and from
the ingress's `FrontendAPI`, which validates, routes and streams.

Services are registered through generic handlers, as the KV receiver does, so the only
generated code is `pdserve_pb2`. The server also carries the standard health service
(for load balancers and Kubernetes probes) and server reflection (for grpcurl). It serves
plaintext, TLS, or mutual TLS, as `IngressConfig`'s grpc_tls_* files say.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from pdserve.config.cluster import IngressConfig
from pdserve.deployments.api_keys import bearer_token
from pdserve.deployments.frontend import FrontendAPI
from pdserve.errors import InvalidRequest, RetryLater, ServeError
from pdserve.prefill.requests import (
    GenerateChunk,
    GenerateRequest,
    Objectives,
    Sampling,
    TokenLogprob,
    checked_session_id,
)
from pdserve.proto import pdserve_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "pdserve.v1.Generation"
MAX_RECEIVE_BYTES = 16 << 20
"""Largest request accepted: room for a long prompt as text or token ids."""
CHAT_ROLES = ("system", "user", "assistant")
TOKEN_ID_LIMIT = 2**31
"""Token ids at or above this are no vocabulary's; the frontend checks the model's own size."""
TRACE_KEYS = ("traceparent", "tracestate")


class GrpcHealth:
    """The health service's status for the whole server ("") and for Generation; the
    ingress flips it so that probes stop sending traffic before it stops serving."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.servicer.set(service, status)


def server_credentials(ingress: IngressConfig) -> grpc.ServerCredentials | None:
    """The gRPC API's TLS credentials from the files `ingress` names (None: plaintext), read now,
    so that a missing or unreadable file fails the ingress's start naming it."""
    if ingress.grpc_tls_cert_file is None:
        return None
    assert ingress.grpc_tls_key_file is not None
    client_ca = ingress.grpc_tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(_read_pem(ingress.grpc_tls_key_file, "grpc_tls_key_file"),
          _read_pem(ingress.grpc_tls_cert_file, "grpc_tls_cert_file"))],
        root_certificates=None if client_ca is None else _read_pem(client_ca, "grpc_tls_client_ca_file"),
        require_client_auth=client_ca is not None,
    )


def _read_pem(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"ingress.{field}: cannot read {path}: {exc.strerror}") from None


async def start_grpc_server(get_frontend: Callable[[], FrontendAPI], port: int, host: str = "127.0.0.1",
                            health_status: GrpcHealth | None = None,
                            credentials: grpc.ServerCredentials | None = None) -> grpc.aio.Server:
    """Bind host:port, serve Generation, health and reflection, and return the started server.

    `get_frontend` is called once per RPC, so the ingress can swap its frontend while
    serving. Pass `health_status` to flip the health service later; it starts SERVING.
    With `credentials` (see `server_credentials`) the port serves TLS only.
    """
    health_status = health_status or GrpcHealth()
    await health_status.set_serving(True)
    # No SO_REUSEPORT: a second service on a taken port must fail, not share its connections.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    api = _GenerationService(get_frontend)
    # The request deserializer is None so that a malformed request (invalid UTF-8, say)
    # is the client's INVALID_ARGUMENT rather than grpc's generic INTERNAL.
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            api.generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString
        ),
        "GenerateUnary": grpc.unary_unary_rpc_method_handler(
            api.generate_unary, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health_status.servicer, server)
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((SERVICE, health_service, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio's "Failed to bind", which says no more
        causes = "the port is taken or the host is not this machine's"
        if credentials is not None:
            causes += ", or a grpc_tls_* file is not a PEM certificate or key"
        raise OSError(f"gRPC API cannot bind {address}: {causes}") from None
    await server.start()
    log.info("gRPC API listening on %s (%s)", address, "plaintext" if credentials is None else "TLS")
    return server


class _GenerationService:
    """The two Generation RPCs; every failure ends as a status code, never a crash."""

    def __init__(self, get_frontend: Callable[[], FrontendAPI]):
        self._get_frontend = get_frontend

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            frontend, req, client_id = await _translate(raw, context, self._get_frontend)
            response_id = client_id or req.request_id
            chunks = frontend.stream(req)
            try:
                async for chunk in chunks:
                    yield _response(chunk, response_id)
            finally:  # a cancelled RPC must free its engine slot now, not when collected
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    async def generate_unary(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        try:
            frontend, req, client_id = await _translate(raw, context, self._get_frontend)
            texts: list[str] = []
            token_ids: list[int] = []
            logprobs: list[TokenLogprob] = []
            last: GenerateChunk | None = None
            async for chunk in frontend.stream(req):
                texts.append(chunk.text)
                token_ids.extend(chunk.token_ids)
                logprobs.extend(chunk.logprobs or [])
                last = chunk
            if last is None:
                raise RuntimeError("the frontend streamed no chunk")
            whole = GenerateChunk(text="".join(texts), token_ids=token_ids, prompt_tokens=last.prompt_tokens,
                                  completion_tokens=last.completion_tokens, finish_reason=last.finish_reason,
                                  slo=last.slo, logprobs=logprobs if req.sampling.logprobs is not None else None,
                                  cached_tokens=last.cached_tokens)
            return _response(whole, client_id or req.request_id)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)


async def _translate(raw: bytes, context: grpc.aio.ServicerContext,
                     get_frontend: Callable[[], FrontendAPI]) -> tuple[FrontendAPI, GenerateRequest, str]:
    """Check the caller's key, parse and validate the wire request; returns the frontend, its
    request and the client's id."""
    metadata = context.invocation_metadata() or ()
    frontend = get_frontend()
    frontend.authorize(bearer_token(next((v for k, v in metadata if k == "authorization"), None)))
    try:
        msg = pb.GenerateRequest.FromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(f"the request is not a valid pdserve.v1.GenerateRequest ({exc})") from None
    if not msg.model:
        raise InvalidRequest(f"model is required; this service serves {frontend.model_name!r}", param="model")
    frontend.check_model(msg.model)
    sampling = _sampling(msg)
    objectives = _objectives(msg)
    session_id = checked_session_id(msg.session_id, "session_id")
    carrier = {k: v for k, v in metadata if k in TRACE_KEYS} or None
    req = await _request(frontend, msg, sampling, carrier, objectives)
    req.session_id = session_id
    return frontend, req, msg.request_id


async def _request(frontend: FrontendAPI, msg: pb.GenerateRequest, sampling: Sampling,
                   carrier: dict[str, str] | None, objectives: Objectives) -> GenerateRequest:
    """The frontend's request for the message's input: a prompt, a chat or token ids."""
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("set one of prompt, chat or prompt_token_ids", param="input")
    if kind == "prompt":
        if not msg.prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return await frontend.completion_request(msg.prompt, sampling, carrier, objectives)
    if kind == "chat":
        if not msg.chat.messages:
            raise InvalidRequest("chat needs at least one message", param="chat")
        for i, m in enumerate(msg.chat.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"chat.messages[{i}].role is {m.role!r}; use one of {', '.join(CHAT_ROLES)}",
                                     param="chat")
        messages = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
        return await frontend.chat_request(messages, sampling, carrier, objectives)
    ids = list(msg.prompt_token_ids.ids)
    if not ids:
        raise InvalidRequest("prompt_token_ids must not be empty", param="prompt_token_ids")
    for i, t in enumerate(ids):
        if not 0 <= t < TOKEN_ID_LIMIT:
            raise InvalidRequest(f"prompt_token_ids[{i}] is {t}, not a token id", param="prompt_token_ids")
    return await frontend.completion_request(ids, sampling, carrier, objectives)


def _sampling(msg: pb.GenerateRequest) -> Sampling:
    """Validate the sampling fields with the same model the HTTP API uses."""
    fields: dict = {"stop": list(msg.stop), "stop_token_ids": list(msg.stop_token_ids),
                    "logit_bias": {t: float(f"{b:.7g}") for t, b in msg.logit_bias.items()}}
    for name in ("max_tokens", "seed", "top_k", "min_tokens", "logprobs"):
        if msg.HasField(name):
            fields[name] = getattr(msg, name)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if msg.HasField(name):
            # float32 on the wire: 0.7 arrives as 0.699999988; keep the digits the client wrote.
            fields[name] = float(f"{getattr(msg, name):.7g}")
    if msg.HasField("structured_outputs"):
        fields["structured"] = _structured(msg.structured_outputs)
    try:
        return Sampling(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ["structured_outputs" if part == "structured" else str(part) for part in first["loc"]]
        raise InvalidRequest(f"{'.'.join(loc)}: {first['msg']}", param=loc[0]) from None


def _structured(msg: pb.StructuredOutputs) -> dict:
    """`StructuredOutput`'s fields (validated with the request's sampling)."""
    fields: dict = {"disable_any_whitespace": msg.disable_any_whitespace,
                    "disable_additional_properties": msg.disable_additional_properties}
    which = msg.WhichOneof("constraint")
    if which == "json_schema":
        try:
            fields["json_schema"] = json.loads(msg.json_schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"structured_outputs.json_schema is not JSON: {exc}",
                                 param="structured_outputs") from None
    elif which == "choice":
        fields["choice"] = list(msg.choice.choices)
    elif which is not None:
        fields[which] = getattr(msg, which)
    return fields


def _objectives(msg: pb.GenerateRequest) -> Objectives:
    fields = {name: getattr(msg, name) for name in ("ttft_ms", "tpot_ms", "priority") if msg.HasField(name)}
    try:
        return Objectives(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"{first['loc'][0]}: {first['msg']}", param=str(first["loc"][0])) from None


def _response(chunk: GenerateChunk, request_id: str) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason or "",
                               request_id=request_id,
                               logprobs=[pb.TokenLogprob(token=t.token, logprob=t.logprob,
                                                         top=[pb.TopLogprob(token=a, logprob=b) for a, b in t.top])
                                         for t in chunk.logprobs or []])
    if chunk.finish_reason is not None:
        resp.usage.prompt_tokens = chunk.prompt_tokens
        resp.usage.completion_tokens = chunk.completion_tokens
        resp.usage.total_tokens = chunk.prompt_tokens + chunk.completion_tokens
        if chunk.cached_tokens is not None:
            resp.usage.cached_tokens = chunk.cached_tokens
    if chunk.slo is not None:
        r = chunk.slo
        resp.slo.CopyFrom(pb.SLOReport(ttft_ms=r.ttft_ms, tpot_ms=r.tpot_ms, ttft_objective_ms=r.slo.ttft_ms,
                                       tpot_objective_ms=r.slo.tpot_ms, ttft_met=r.ttft_met, tpot_met=r.tpot_met,
                                       priority=r.slo.priority))
    return resp


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """End the RPC with the status the HTTP API would answer with as its status code."""
    if isinstance(exc, RetryLater):
        retry = exc.headers()["Retry-After"]
        await context.abort(exc.grpc_code, exc.message, trailing_metadata=(("retry-after-s", retry),))
    if isinstance(exc, ServeError):
        await context.abort(exc.grpc_code, exc.message)
    log.error("gRPC request failed unexpectedly", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
