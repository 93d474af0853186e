"""Errors a request can end with, and how each one reads in HTTP and in gRPC.

One table so that the two ingresses answer the same failure the same way:
OpenAI's error body and status code over HTTP, the matching status code over gRPC.
"""

from __future__ import annotations

import grpc


class ServeError(Exception):
    """Base of the errors a client sees; `message` never carries secrets."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "server_error"  # OpenAI's `error.type`

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the offending request field, when there is one
        self.code = code  # OpenAI's `error.code`

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ServeError):
    """The request cannot be served as written (bad field, prompt too long, ...)."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class Unauthenticated(ServeError):
    """The service requires an API key and the request carried none, or an unknown one."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    error_type = "invalid_request_error"

    def __init__(self) -> None:
        super().__init__("missing or invalid API key: send one as `Authorization: Bearer <key>`",
                         code="invalid_api_key")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ServeError):
    """The request body is larger than the service reads (`ingress.max_body_bytes`)."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "invalid_request_error"

    def __init__(self, limit_bytes: int):
        super().__init__(f"the request body exceeds this service's limit of {limit_bytes} bytes",
                         code="request_too_large")


class ModelNotFound(ServeError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"

    def __init__(self, model: str, served: str):
        super().__init__(f"The model {model!r} does not exist; this service serves {served!r}", param="model",
                         code="model_not_found")


class RetryLater(ServeError):
    """A refusal a retry after `retry_after_s` may get past: sent as `Retry-After` (HTTP) or the
    `retry-after-s` trailer (gRPC)."""

    def __init__(self, message: str, retry_after_s: float = 1.0, *, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class Overloaded(RetryLater):
    """Every instance that could take the request is at its limit: retry later."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message, retry_after_s, code="overloaded")


class Unavailable(RetryLater):
    """No instance can serve at all right now (none registered, or the chosen one died)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable"


class ReplicaLost(Unavailable):
    """The replica serving a request died (its Ray actor is gone). The ingress moves the
    request to another replica when it may; this is what the client sees when it may not."""

    def __init__(self, phase: str, replica_id: str, departed: bool = True):
        super().__init__(f"the {phase} replica serving the request was lost", code="replica_lost")
        self.phase = phase
        self.replica_id = replica_id
        self.departed = departed
        """It is gone for good (dead, or stopping); False: it may yet appear (see ReplicaGone)."""


class KVLost(ReplicaLost):
    """The prompt's KV never reached the decode engine (its prefill replica lost, or stuck past the
    transfer's lease), so no token came: the ingress serves the request again, like one whose
    replica died before its first token."""

    def __init__(self, request_id: str):
        super().__init__("prefill", "", departed=False)
        self.message = f"the prompt's KV cache for {request_id} did not arrive"


class ReplicaGone(RuntimeError):
    """The replica a call was meant for is not among the deployment's running replicas;
    `departed`: it was, and left (stopping or dead), so it will not come back. Raised by the
    exact-replica router, which Serve ships to each process by value: defined here, the class
    the ingress catches is the one the router raises."""

    def __init__(self, replica_id: str, waited_s: float, departed: bool = False):
        why = "it left the running replicas" if departed else f"waited {waited_s:.1f} s for it"
        super().__init__(f"replica {replica_id} is not running ({why})")
        self.replica_id = replica_id
        self.departed = departed


class EngineFailure(ServeError):
    """The engine failed while serving the request."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "server_error"
