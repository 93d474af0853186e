"""What every engine replica shares: a vLLM AsyncLLM built from its pool's config,
pinned to its cores, reporting its load to the controller, shut down with the replica.

The prefill, decode and colocated deployments (`prefill/server.py`, `decode/server.py`,
`decode/colocated.py`) add the phase they serve. It lives with the prefill engine, the lowest of
the engine folders, so that `decode/` builds on it without a cycle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

from pdserve import telemetry
from pdserve.config.cluster import ClusterConfig
from pdserve.config.experts import CONFIG_ENV
from pdserve.controller.hot_experts import ExpertReport
from pdserve.controller.instance import LoadReport
from pdserve.kvtransfer.vllm_config import kv_transfer_config
from pdserve.prefill.engine_load import EngineLoad, RequestProgress
from pdserve.prefill.engine_watchdog import WATCHDOG_ENV
from pdserve.prefill.grammar_carry import ENTRY_POINT as GRAMMAR_CARRY
from pdserve.prefill.kv_events import KVEventFeed, events_endpoint, kv_events_config
from pdserve.prefill.requests import SAMPLED_TOKENS_KEY, GenerateRequest
from pdserve.prefill.structured import BACKEND as STRUCTURED_BACKEND
from pdserve.prefill.worker_extension import EXTENSION

log = logging.getLogger("pdserve.engine")

REPORT_INTERVAL_S = 0.5
METRICS_PUSH_S = 5.0
"""How often an engine replica pushes its vLLM metrics to the controller (the ingress's /metrics
serves what was pushed last: at most this old)."""


def served_model_name(cfg: ClusterConfig, model_path: str) -> str:
    return cfg.served_model_name or os.path.basename(model_path.rstrip("/"))


class EngineServer:
    """Base of the engine deployments; `role` is what its engine does ("prefill", "decode", "colocated",
    "adaptive"), and its pool is its Serve deployment (one role may have several pools: `adaptive_pools`)."""

    role = ""

    async def __init__(self, cfg: ClusterConfig, model_path: str, controller: Any, kv_listen_addr: str = ""):
        import ray
        from ray import serve

        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.pool_name = ctx.deployment
        pool = cfg.pools()[self.pool_name]
        telemetry.setup_tracing(cfg.tracing, f"{self.role}:{self.replica_id}")
        telemetry.setup_logging(cfg.log_level)
        cpu_bind = pool.cpu_binds[ctx.rank.local_rank % len(pool.cpu_binds)] if pool.cpu_binds else ""
        os.environ.update(
            {WATCHDOG_ENV: "1"},  # the engine's processes end if this replica is killed
            VLLM_CPU_KVCACHE_SPACE=str(pool.kv_cache_gib),
            VLLM_LOGGING_LEVEL=cfg.log_level,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if cpu_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        if pool.num_gpus == 0 and pool.cpu_nice:  # the engine's processes, started below, inherit it
            os.nice(pool.cpu_nice)
        self.load = EngineLoad()
        engine_args = dict(pool.engine_args)
        self.expert_buffers = pool.experts.for_accelerator(pool.accelerator_type) if pool.experts else None
        """This replica's buffering, set up while the engine loads the model (`worker_extension.py`)."""
        self._hot: list[list[int]] | None = None
        engine_args["worker_extension_cls"] = EXTENSION
        if self.expert_buffers:
            os.environ[CONFIG_ENV] = self.expert_buffers.model_dump_json()  # the engine's processes inherit it
        self.kv_events = KVEventFeed(events_endpoint(self.replica_id)) if cfg.routing.prefix_aware else None
        """Its prefix cache's changes for the controller's prefix-aware routing (listening before the engine publishes)."""
        if self.kv_events is not None:
            engine_args.setdefault("kv_events_config", kv_events_config(self.kv_events.endpoint))
        self.engine = self._build_engine(cfg, engine_args, model_path, kv_listen_addr)
        if self.expert_buffers:
            await self.engine.collective_rpc("pdserve_require_expert_buffers")
        if not all(await self.engine.collective_rpc("pdserve_continues_answers")):  # see worker_extension.py
            log.warning("%s replica %s: this engine's model runner cannot skip a seeded request's draws nor count "
                        "an answer's earlier tokens in its penalties; an answer continued here is sampled anew "
                        "where it continues", self.role, self.replica_id)
        if GRAMMAR_CARRY not in {e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")}:
            log.warning("%s replica %s: vLLM plugin %s is not installed (reinstall pdserve): a structured answer "
                        "continued here restarts its grammar", self.role, self.replica_id, GRAMMAR_CARRY)
        if pool.warmup:
            await self._warm_up(cfg.max_model_len)
        self.controller = controller
        node_id = ray.get_runtime_context().get_node_id()
        sched = self.engine.vllm_config.scheduler_config
        self._report = LoadReport(self.replica_id, self.pool_name, node_id, pool.accelerator_type, kv_listen_addr,
                                  pool.max_ongoing_requests, time.time(),
                                  prefill_chunk_tokens=sched.max_num_batched_tokens if sched.enable_chunked_prefill else 0,
                                  tp_size=self.engine.vllm_config.parallel_config.tensor_parallel_size)
        self._reporter = asyncio.create_task(self._report_loop())
        log.info("%s replica %s ready (cores %s, node %s, kv %s)", self.role, self.replica_id, cpu_bind or "any",
                 node_id[:8], kv_listen_addr or "-")

    def _build_engine(self, cfg: ClusterConfig, engine_args: dict[str, Any], model_path: str, kv_listen_addr: str):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kv_cfg = None
        if self.role in ("prefill", "decode", "adaptive"):
            settings = cfg.kv_transfer.model_dump(mode="json", exclude={"secret", "listen_addr"})
            settings["secret"] = cfg.kv_transfer.secret_value
            if kv_listen_addr:
                settings["listen_addr"] = kv_listen_addr
            # A prompt whose KV never arrives (its prefill replica lost, or stuck past the lease) ends
            # there, and the ingress serves it again elsewhere (errors.KVLost).
            kv_cfg = kv_transfer_config(self.role, settings)
        from vllm.config import StructuredOutputsConfig
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        eager = cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu
        # The ingress checks a structured output's constraint with xgrammar's rules: the engine compiles it so too.
        engine_args = {"enforce_eager": eager, "structured_outputs_config": StructuredOutputsConfig(
            backend=STRUCTURED_BACKEND), **engine_args}
        dtype = cfg.engine_dtype
        log.info("%s engine dtype %s (config %s, %s)", self.role, dtype, cfg.dtype, "CPU" if on_cpu else "GPU")
        if on_cpu and dtype == "bfloat16":
            log.warning("bfloat16 on a CPU: vLLM's CPU bfloat16 path answers wrongly on Intel AMX machines; "
                        "dtype auto (float32) is right on every CPU")
        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=served_model_name(cfg, model_path),
            dtype=dtype,
            max_model_len=cfg.max_model_len,
            kv_transfer_config=kv_cfg,
            **engine_args,
        )
        return AsyncLLM.from_engine_args(args, stat_loggers=[self.load.stat_logger])

    async def _warm_up(self, max_model_len: int) -> None:
        """Prompts that fill the engine's largest step and spill into the next one, run together,
        so that no client request pays a kernel path's first-time cost (a whole step, a prompt
        continued across steps, prompts batched together)."""
        from vllm import SamplingParams

        n = min(max_model_len - 2, self.engine.vllm_config.scheduler_config.max_num_batched_tokens)
        start = time.perf_counter()

        async def one(i: int, tokens: int) -> None:
            prompt = {"prompt_token_ids": [100 + (i * 7 + j) % 1000 for j in range(tokens)]}
            async for _ in self.engine.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0), f"warmup-{i}"):
                pass

        lengths = (n, n // 2 + 1, 16)
        await asyncio.gather(*(one(i, t) for i, t in enumerate(lengths)))
        log.info("%s replica %s warmed up with prompts of %s tokens in %.1f s", self.role, self.replica_id, lengths,
                 time.perf_counter() - start)

    async def _report_loop(self) -> None:
        metrics_pushed_s = -float("inf")
        while True:
            try:
                report = self.load.report(self._report)
                if self.kv_events is not None:
                    report = dataclasses.replace(report, cache=self.kv_events.take())
                if self.expert_buffers:
                    report = dataclasses.replace(report, experts=await self._expert_report())
                try:
                    hot = await self.controller.report.remote(report)
                except Exception:
                    if self.kv_events is not None:
                        self.kv_events.lose()
                    raise
                if hot is not None and hot != self._hot:
                    await self.engine.collective_rpc("pdserve_set_hot_experts", args=(hot,))
                    self._hot = hot
                if time.monotonic() - metrics_pushed_s >= METRICS_PUSH_S:
                    metrics_pushed_s = time.monotonic()
                    await self.controller.push_engine_metrics.remote(self.replica_id, self.vllm_metrics())
            except Exception as exc:  # the controller restarting must not stop the replica
                log.warning("load report to the controller failed: %s", exc)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _expert_report(self) -> ExpertReport:
        stats = await self.expert_stats()
        return ExpertReport(**{name: stats[name] for name in ExpertReport.__dataclass_fields__})

    @contextmanager
    def serving(self, span_name: str, req: GenerateRequest, attributes: dict[str, Any],
                prefills: bool) -> Iterator[tuple[trace.Span, RequestProgress]]:
        """One request on this replica: counted in the load reports while it runs (`prefills`:
        this engine computes the prompt), and one span of the request's trace (parented
        through the request's trace carrier)."""
        span = telemetry.tracer().start_span(span_name, context=telemetry.extract(req.trace_carrier),
                                             attributes={"pdserve.replica": self.replica_id, **attributes})
        try:
            with self.load.track(len(req.prompt_token_ids), prefills) as progress:
                yield span, progress
        finally:
            span.end()

    def sampling_params(self, sampling: Any, max_tokens: int, kv_transfer_params: dict | None,
                        sampled_tokens: int = 0):
        """vLLM's parameters for one engine call; `sampled_tokens` of the answer were sampled
        before it (elsewhere): the worker extension has a seeded generator skip their draws and
        the penalties count them as the answer's, and a structured answer's grammar is moved past
        them (`grammar_carry.py`)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] = {}
        if kv_transfer_params:
            extra["kv_transfer_params"] = kv_transfer_params
        if sampled_tokens:
            extra[SAMPLED_TOKENS_KEY] = sampled_tokens
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            min_tokens=sampling.remaining_min_tokens(sampled_tokens, max_tokens),
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            logprobs=sampling.logprobs,
            logit_bias=dict(sampling.logit_bias) or None,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            skip_special_tokens=sampling.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=sampling.structured.vllm_params() if sampling.structured else None,
            extra_args=extra or None,
        )

    def vllm_metrics(self) -> str:
        """This process's Prometheus exposition, the engine's `vllm:*` metrics among it (pushed to
        the controller; the ingress serves those: deployments/engine_metrics.py)."""
        from prometheus_client import generate_latest
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return generate_latest(get_prometheus_registry()).decode()

    async def expert_stats(self) -> dict:
        """This replica's expert-buffer counters and the hot set its workers hold ({} when not buffered)."""
        return (await self.engine.collective_rpc("pdserve_expert_stats"))[0] if self.expert_buffers else {}

    def finished_spans(self) -> list[dict]:
        return telemetry.finished_spans()

    def check_health(self) -> None:
        if self.engine.errored:
            raise RuntimeError(f"{self.role} engine errored: {self.engine.dead_error}")

    async def __del__(self) -> None:
        if reporter := getattr(self, "_reporter", None):
            reporter.cancel()
        if feed := getattr(self, "kv_events", None):
            feed.close()
        if engine := getattr(self, "engine", None):  # absent when the constructor failed
            log.info("%s replica %s shutting down its engine", self.role, self.replica_id)
            engine.shutdown()
        telemetry.shutdown_tracing()
