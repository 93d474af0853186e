"""The ingress's core, shared by the HTTP and gRPC APIs: tokenize and validate a
request, route it to engines, stream the answer back.

Each API module only translates its wire format to and from these calls, so both
APIs validate, route and fail the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, Protocol

from opentelemetry import trace

from pdserve import telemetry
from pdserve.config.cluster import ClusterConfig
from pdserve.controller.decision import Decision, RouteRequest
from pdserve.controller.prefix_index import block_hashes
from pdserve.deployments.api_keys import ENV_VAR, ApiKeys
from pdserve.deployments.disaggregated import disaggregated_answer
from pdserve.deployments.engine_metrics import render_engine_metrics
from pdserve.deployments.failover import AnswerRun, ResumedText, decode_stream
from pdserve.deployments.instance_view import InstanceView
from pdserve.deployments.metrics import IngressMetrics
from pdserve.deployments.request_builder import RequestBuilder
from pdserve.deployments.route_channel import RouteChannel, route_channel_secret
from pdserve.deployments.route_waits import ROUTE_POLL_S, route_waiting
from pdserve.deployments.tool_parsing import ToolParsing
from pdserve.errors import (
    InvalidRequest,
    ModelNotFound,
    ReplicaLost,
    ServeError,
    Unauthenticated,
    Unavailable,
)
from pdserve.prefill.engine import served_model_name
from pdserve.prefill.requests import GenerateChunk, GenerateRequest, Objectives, Sampling, SLOReport

log = logging.getLogger("pdserve.ingress")

ENGINE_METRICS_WAIT_S = 2.0
"""How long a /metrics scrape waits for the engine replicas' own metrics (from the controller)."""


class FrontendAPI(Protocol):
    """What an API module needs from the ingress. Every method raises a
    `pdserve.errors.ServeError` subclass for a request it will not serve."""

    model_name: str
    """The one model this service serves (OpenAI's `model` field)."""
    max_model_len: int
    """Context length in tokens: prompt plus generated tokens."""
    max_body_bytes: int
    """Largest HTTP request body read (`ingress.max_body_bytes`)."""
    tool_parsing: ToolParsing | None
    """The tool-call parser that reads tool_choice "auto" answers; None: "auto" is refused."""

    def authorize(self, api_key: str | None) -> None:
        """Raise Unauthenticated unless `api_key` is one of the service's keys (or it has none)."""

    def check_model(self, model: str) -> None:
        """Raise ModelNotFound unless `model` is the served model's name."""

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None,
                           objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        """Apply the chat template to `messages` ({"role", "content", ...} dicts) and `tools`,
        tokenize and validate lengths (InvalidRequest when the prompt does not fit the context);
        objectives the client left unset take the service's defaults."""

    async def completion_request(self, prompt: str | list[int], sampling: Sampling,
                                 trace_carrier: dict[str, str] | None = None,
                                 objectives: Objectives | None = None) -> GenerateRequest:
        """Tokenize a text prompt (or take token ids as given) and validate lengths."""

    async def tokenize(self, prompt: str | list[dict[str, str]], add_special_tokens: bool,
                       add_generation_prompt: bool) -> tuple[list[int], list[str]]:
        """The token ids (and their strings) of a text prompt, or of messages through the chat
        template, as a generation request would have them; InvalidRequest as for one."""

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`; InvalidRequest for an id outside the vocabulary."""

    def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Route the request and stream its chunks; the last one has a finish_reason and the
        SLO report. Raises before the first chunk when the request cannot be routed
        (Overloaded: busy, or predicted to miss its objectives; Unavailable), EngineFailure
        when an engine fails mid-stream."""

    async def health(self) -> dict:
        """{"status": "ok" | "unavailable", ...pool sizes}: ok when every pool has a live instance."""

    async def metrics_text(self) -> tuple[bytes, str]:
        """Prometheus exposition of this ingress's metrics and the live engines' `vllm:*` ones
        (pushed by the engines every few seconds), and its content type."""


class Frontend:
    """The FrontendAPI over a controller and the engine pools' Serve handles."""

    def __init__(self, cfg: ClusterConfig, model_path: str, controller: Any, pools: dict[str, Any],
                 ingress_id: str = ""):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.model_name = served_model_name(cfg, model_path)
        self.max_model_len = cfg.max_model_len
        self.max_body_bytes = cfg.ingress.max_body_bytes
        self.requests = RequestBuilder(AutoTokenizer.from_pretrained(model_path), cfg.max_model_len, cfg.slo)
        self.tool_parsing = ToolParsing(cfg.tool_call_parser, model_path) if cfg.tool_call_parser else None
        self.controller = controller
        self.ingress_id = ingress_id
        """This ingress's Serve replica id: the controller drops its bookings once Serve no longer runs it."""
        self.pools = pools
        """Each engine pool's Serve handle, by pool name: a decision's targets name theirs."""
        self.metrics = IngressMetrics()
        self.routes = RouteChannel(controller, route_channel_secret(cfg),
                                   lambda path: self.metrics.route_calls.labels(path).inc())
        """Route calls to the controller, over its routing channel when it has one."""
        self.api_keys = ApiKeys.from_sources((k.get_secret_value() for k in cfg.ingress.api_keys),
                                             os.environ.get(ENV_VAR, ""))
        self._poller: asyncio.Task | None = None
        self._background: set[asyncio.Future] = set()
        """Engine calls left to finish after their request ended (held so they are not collected)."""
        self.view = InstanceView(cfg.pools())
        log.info("ingress: %s", "API keys required" if self.api_keys.enabled else "no API key required")

    # --- validation ----------------------------------------------------------
    def authorize(self, api_key: str | None) -> None:
        if not self.api_keys.admits(api_key):
            self.metrics.requests.labels("unauthenticated").inc()
            raise Unauthenticated()

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            self.metrics.requests.labels("not_found").inc()
            raise ModelNotFound(model, self.model_name)

    async def chat_request(self, messages: list[dict[str, Any]], sampling: Sampling,
                           trace_carrier: dict[str, str] | None = None,
                           objectives: Objectives | None = None,
                           tools: list[dict[str, Any]] | None = None) -> GenerateRequest:
        with self._counting_refusals():
            return await self.requests.chat(messages, sampling, trace_carrier, objectives, tools)

    async def completion_request(self, prompt: str | list[int], sampling: Sampling,
                                 trace_carrier: dict[str, str] | None = None,
                                 objectives: Objectives | None = None) -> GenerateRequest:
        with self._counting_refusals():
            return await self.requests.completion(prompt, sampling, trace_carrier, objectives)

    async def tokenize(self, prompt: str | list[dict[str, str]], add_special_tokens: bool,
                       add_generation_prompt: bool) -> tuple[list[int], list[str]]:
        return await self.requests.tokenize(prompt, add_special_tokens, add_generation_prompt)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self.requests.detokenize(token_ids)

    @contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        try:
            yield
        except InvalidRequest:
            self.metrics.requests.labels("invalid").inc()
            raise

    # --- serving -------------------------------------------------------------
    async def stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        tracer = telemetry.tracer()
        root = tracer.start_span("ingress", context=telemetry.extract(req.trace_carrier),
                                 attributes={"pdserve.request_id": req.request_id,
                                             "pdserve.prompt_tokens": len(req.prompt_token_ids)})
        req.trace_carrier = telemetry.inject(root)
        run = AnswerRun(time.perf_counter())
        outcome = "error"
        try:
            async with asyncio.timeout(self.cfg.ingress.request_timeout_s):
                async for chunk in self._attempts(req, run, root):
                    yield chunk
            outcome = "ok"
        except ServeError as err:
            outcome = {400: "invalid", 429: "rejected", 503: "unavailable"}.get(err.http_status, outcome)
            root.set_status(trace.StatusCode.ERROR, err.message)
            raise
        except TimeoutError:
            outcome = "timeout"
            raise Unavailable(f"the request did not finish within {self.cfg.ingress.request_timeout_s:.0f} s") from None
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            self.metrics.requests.labels(outcome).inc()
            root.set_attribute("pdserve.outcome", outcome)
            root.end()

    async def _attempts(self, req: GenerateRequest, run: AnswerRun, root: trace.Span) -> AsyncIterator[GenerateChunk]:
        """Route and serve `req`; when a replica serving it dies, route it again (up to
        `replica_loss_retries` times): before the first token the prompt is simply served
        anew, after it the new decode replica goes on from the tokens already sent."""
        retries = self.cfg.ingress.replica_loss_retries
        for n in range(retries + 1):
            seam = ResumedText(await self.requests.unsent_text(
                run.token_ids, run.text, req.sampling.skip_special_tokens), req.sampling.stop) if n else None
            if n and run.tokens >= req.sampling.max_tokens:  # it died after its last token, before saying so
                text, stopped = seam.feed("", last=True)
                yield self._to_client(GenerateChunk(text, [], 0, 0, "stop" if stopped else "length"), req, run,
                                       len(req.prompt_token_ids))
                return
            attempt = req.resumed(run.token_ids, n) if n else req
            with telemetry.tracer().start_as_current_span("routing", context=trace.set_span_in_context(root)) as span:
                left_s = self.cfg.ingress.request_timeout_s - (time.perf_counter() - run.start_s)
                decision = await self._route(attempt, resuming=n > 0, lifetime_s=left_s)
                span.set_attribute("pdserve.decision", f"{decision.outcome.value}: {decision.reason}")
            sent_before = run.tokens
            try:
                async for chunk in self._run(attempt, decision, run, len(req.prompt_token_ids), seam):
                    yield chunk
                return
            except ReplicaLost as lost:
                await self._forget_replica(lost)
                if run.finished:  # it died after sending the last chunk: the client has it all
                    self.metrics.replica_losses.labels(lost.phase, "after_answer").inc()
                    log.warning("request %s: %s replica %s lost after the answer ended", req.request_id,
                                lost.phase, lost.replica_id)
                    return
                self.metrics.replica_losses.labels(lost.phase, "retried" if n < retries else "failed").inc()
                log.warning("request %s: %s replica %s lost after %d of %d tokens; %s", req.request_id, lost.phase,
                            lost.replica_id, run.tokens, req.sampling.max_tokens,
                            f"routing it again (retry {n + 1} of {retries})" if n < retries else "no retry left")
                if n == retries:
                    raise
            finally:
                self.controller.release.remote(attempt.request_id, run.tpot_ms(), run.tokens - sent_before)

    async def _route(self, req: GenerateRequest, resuming: bool, lifetime_s: float) -> Decision:
        """The controller's pair for `req`, waited for as `route_waiting` says."""
        hashes = tuple(block_hashes(req.prompt_token_ids)) if self.cfg.routing.prefix_aware else ()
        route = RouteRequest(req.request_id, len(req.prompt_token_ids), req.sampling.max_tokens or 1, req.slo,
                             lifetime_s=max(lifetime_s, 0.0), ingress_id=self.ingress_id, prefix_hashes=hashes,
                             session_id=req.session_id)
        decision, held_s = await route_waiting(self.routes.choose, route, resuming, self.cfg.ingress.route_wait_s)
        if held_s:
            self.metrics.held_s.observe(held_s)
        return decision

    async def _forget_replica(self, lost: ReplicaLost) -> None:
        """Take the dead replica out of routing now rather than when its reports stop (`ttl_s`),
        so that the retry goes elsewhere."""
        if not lost.replica_id:  # the KV went missing (KVLost), no replica is known gone
            return
        try:
            await asyncio.wait_for(self.controller.replica_lost.remote(lost.replica_id, lost.departed),
                                   ROUTE_POLL_S * 4)
        except Exception as exc:  # the retry's routing copes with a controller that is away
            log.warning("could not tell the controller that replica %s is lost: %s", lost.replica_id, exc)

    async def _run(self, req: GenerateRequest, decision: Decision, run: AnswerRun,
                   client_prompt_tokens: int, seam: ResumedText | None) -> AsyncIterator[GenerateChunk]:
        """One attempt at `req` on the decided pair; its chunks count on from what `run` already
        sent and report the client's own prompt length. After a replica loss `seam` joins the
        new replica's text to what was sent."""
        assert decision.decode is not None and req.sampling.max_tokens is not None
        lease_ms = self.cfg.kv_transfer.lease_ms
        local = decision.prefill is None  # colocated, or prefilled where it decodes
        if self.cfg.mode in ("colocated", "adaptive"):  # one pool: its instances' metrics under its name
            pool_name = ttft_pool = self.cfg.mode
        else:
            pool_name, ttft_pool = "decode", "decode" if local else "prefill"
        dispatched_s = time.perf_counter()  # a prefill's time is learned from here: see disaggregated._timed
        if local:
            stream = self.pools[decision.decode.pool].options(stream=True).generate.remote(
                req, req.sampling.max_tokens, lease_ms, replica_id=decision.decode.replica_id, local_prefill=True)
            answer = decode_stream(stream, decision)
        else:
            answer = disaggregated_answer(self.pools, req, decision, lease_ms, self._background,
                                          lambda task: self._prefill_done(req.request_id, task),
                                          lambda replica_id: self.view.gone(replica_id, time.monotonic()))
        async with aclosing(answer) as chunks:
            async for chunk in chunks:
                stopped, first = False, False
                if seam is not None:
                    chunk.text, stopped = seam.feed(chunk.text, last=chunk.finish_reason is not None)
                    chunk.finish_reason = "stop" if stopped else chunk.finish_reason
                if chunk.token_ids and run.tokens_arrived(chunk.token_ids):
                    self.metrics.ttft_s.labels(ttft_pool).observe(run.ttft_ms() / 1e3)
                    first = local
                if chunk.kv_transfer:
                    self.metrics.observe_kv(chunk.kv_transfer)
                try:
                    yield self._to_client(chunk, req, run, client_prompt_tokens)
                finally:  # told once the first token is on its way (disaggregated_answer tells its own)
                    if first:
                        self.controller.prefill_done.remote(req.request_id, (run.first_s - dispatched_s) * 1e3)
                if stopped:  # closing the stream stops the new replica's generation
                    break
        if (tpot := run.tpot_ms()) is not None:
            self.metrics.tpot_s.labels(pool_name).observe(tpot / 1e3)
        self.metrics.e2e_s.labels(pool_name).observe(time.perf_counter() - run.start_s)

    def _to_client(self, chunk: GenerateChunk, req: GenerateRequest, run: AnswerRun,
                    client_prompt_tokens: int) -> GenerateChunk:
        """`chunk` as the client gets it: the client's prompt length, its text recorded, and on the
        answer's last chunk its SLO report and the prompt's tokens found cached."""
        chunk.prompt_tokens, chunk.completion_tokens = client_prompt_tokens, run.tokens
        run.text += chunk.text
        if run.cached_tokens is None:
            run.cached_tokens = chunk.cached_tokens
        chunk.cached_tokens = None
        if chunk.finish_reason is not None:
            chunk.cached_tokens = run.cached_tokens
            run.finished = True
            chunk.slo = SLOReport(run.ttft_ms(), run.tpot_ms(), req.slo)
            self.metrics.observe_slo(chunk.slo)
        return chunk

    def _prefill_done(self, request_id: str, task: asyncio.Future) -> None:
        """Tell the controller how long the prefill took at the ingress, so its model of that
        instance learns."""
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("prefill of %s failed: %s", request_id, task.exception())
            return
        self.controller.prefill_done.remote(request_id, float(task.result()["call_ms"]))

    # --- health and metrics --------------------------------------------------
    async def start_polling(self, interval_s: float = 1.0) -> None:
        """Keep the queue-depth and live-instance gauges, and the view `health` answers from,
        fresh from the controller."""
        self.view.poll_interval_s = interval_s

        async def poll() -> None:
            while True:
                try:
                    snapshot = await self.controller.snapshot.remote()
                    self.view.observe(snapshot, time.monotonic())
                    self.metrics.observe_instances(snapshot)
                    self.metrics.observe_autoscale(await self.controller.autoscale_status.remote())
                    self.metrics.observe_experts(await self.controller.expert_status.remote())
                except Exception as exc:
                    log.warning("controller snapshot failed: %s", exc)
                await asyncio.sleep(interval_s)

        self._poller = asyncio.create_task(poll())

    async def health(self) -> dict:
        """From this ingress's own view of the instances, kept fresh by the poller. A stale view (no
        poller yet, or one whose calls fail) is refreshed here, at most once a poll interval."""
        if self.view.refresh_due(time.monotonic()):
            try:
                snapshot = await asyncio.wait_for(self.controller.snapshot.remote(), ROUTE_POLL_S * 4)
                self.view.observe(snapshot, time.monotonic())
            except Exception as exc:  # the controller is away: the answer says so
                log.warning("health: controller snapshot failed: %s", exc)
        live = self.view.live if self.view.fresh(time.monotonic()) else None
        status = "ok" if live is not None and self.view.serves() else "unavailable"
        body = {"status": status, "model": self.model_name, "mode": self.cfg.mode, "live_instances": live or {}}
        if live is None:
            body["reason"] = "no recent view of the instances from the controller"
        return body

    async def metrics_text(self) -> tuple[bytes, str]:
        own, content_type = self.metrics.render()
        return own + await self._engine_metrics(), content_type

    async def _engine_metrics(self) -> bytes:
        """The `vllm:*` metrics the live engine replicas last pushed to the controller (every
        METRICS_PUSH_S); none when the controller does not answer within ENGINE_METRICS_WAIT_S."""
        try:
            texts = await asyncio.wait_for(self.controller.engine_metrics.remote(), ENGINE_METRICS_WAIT_S)
        except Exception as exc:  # the controller restarting: /metrics still answers with the ingress's own
            log.warning("metrics: the engines' metrics from the controller failed: %s", exc)
            return b""
        return render_engine_metrics(texts)

