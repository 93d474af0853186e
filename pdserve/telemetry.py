"""OpenTelemetry tracing for every pdserve process: one trace per request.

The ingress opens the request's root span; its W3C trace context travels to the
engine replicas inside the request (`GenerateRequest.trace_carrier`) and from the
prefill engine to the decode engine inside the KV transfer's `TransferOpen`, so
ingress, routing, prefill, KV transfer and decode spans form one tree across
processes. With the "memory" exporter each process keeps its spans for tests.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pdserve.config.cluster import TracingConfig

log = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()
_memory: InMemorySpanExporter | None = None
_provider: TracerProvider | None = None


def setup_logging(level: str) -> None:
    """pdserve's log lines in a Ray process at `level`, to stderr (Ray's worker log files): Ray gives
    loggers outside its own no handler, which would drop every INFO line (routing decisions among them)."""
    logger = logging.getLogger("pdserve")
    logger.setLevel(level)
    if not any(getattr(h, "pdserve", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
        handler.pdserve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def setup_tracing(cfg: TracingConfig, process: str) -> None:
    """Install this process's tracer provider once; `process` names it in the resource."""
    global _memory, _provider
    if _provider is not None or cfg.exporter == "none":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name, "pdserve.process": process}))
    if cfg.exporter == "memory":
        _memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_memory))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing: %s exporter in %s", cfg.exporter, process)


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer("pdserve")


def inject(span: trace.Span | None = None) -> dict[str, str]:
    """W3C headers (`traceparent`, `tracestate`) of `span`, or of the current span."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(carrier, context=ctx)
    return carrier


def extract(carrier: dict[str, str] | None) -> otel_context.Context:
    """The context a span should be parented to; empty carrier gives a new trace."""
    return _propagator.extract(carrier or {})


def finished_spans() -> list[dict[str, Any]]:
    """This process's finished spans (memory exporter only), as plain dicts."""
    if _memory is None:
        return []
    out = []
    for s in _memory.get_finished_spans():
        out.append({
            "name": s.name,
            "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
            "start_ns": s.start_time,
            "end_ns": s.end_time,
            "attributes": dict(s.attributes or {}),
            "process": (s.resource.attributes or {}).get("pdserve.process"),
        })
    return out
