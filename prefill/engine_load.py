"""What an engine replica tells the controller about its load: its own bookkeeping of the
requests it serves (count, prompt tokens still to prefill, context held, recent TTFT and
TPOT) and vLLM's scheduler statistics (waiting requests, KV blocks in use), which vLLM
hands to a stat logger after every engine step."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from pdserve.controller.instance import LoadReport

EWMA_ALPHA = 0.2
"""Weight of the newest request in the recent TTFT/TPOT averages."""


class _SchedulerStats(StatLoggerBase):
    """Keeps the latest scheduler statistics of one engine (called in the replica's process)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.cache_config = vllm_config.cache_config
        self.waiting = 0
        self.kv_usage = 0.0

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.waiting = scheduler_stats.num_waiting_reqs
            self.kv_usage = scheduler_stats.kv_cache_usage

    def log_engine_initialized(self) -> None:
        pass


def _ewma(old: float, new: float) -> float:
    return new if old == 0.0 else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new


@dataclasses.dataclass
class RequestProgress:
    """One request on the replica; the engine server calls `output` for each piece it streams."""

    load: EngineLoad
    prompt_tokens: int
    prefills: bool
    start_s: float = dataclasses.field(default_factory=time.perf_counter)
    first_s: float = 0.0
    last_s: float = 0.0
    generated: int = 0

    def output(self, new_tokens: int) -> None:
        now = time.perf_counter()
        if not self.first_s and new_tokens:
            self.first_s = now
            if self.prefills:
                self.load.queued_prefill_tokens -= self.prompt_tokens
            self.load.recent_ttft_ms = _ewma(self.load.recent_ttft_ms, (now - self.start_s) * 1e3)
        self.generated += new_tokens
        self.load.context_tokens += new_tokens
        self.last_s = now


class EngineLoad:
    def __init__(self) -> None:
        self.running = 0
        self.queued_prefill_tokens = 0
        self.context_tokens = 0
        self.recent_ttft_ms = 0.0
        self.recent_tpot_ms = 0.0
        self._stats: _SchedulerStats | None = None

    def stat_logger(self, vllm_config: Any, engine_index: int) -> StatLoggerBase:
        """vLLM's per-engine stat logger factory (`AsyncLLM(stat_loggers=[...])`)."""
        self._stats = _SchedulerStats(vllm_config, engine_index)
        return self._stats

    @contextmanager
    def track(self, prompt_tokens: int, prefills: bool) -> Iterator[RequestProgress]:
        """Count a request while it runs; `prefills`: this engine computes its prompt (not a KV load)."""
        progress = RequestProgress(self, prompt_tokens, prefills)
        self.running += 1
        self.context_tokens += prompt_tokens
        if prefills:
            self.queued_prefill_tokens += prompt_tokens
        try:
            yield progress
        finally:
            self.running -= 1
            self.context_tokens -= prompt_tokens + progress.generated
            if prefills and not progress.first_s:
                self.queued_prefill_tokens -= prompt_tokens
            if progress.generated > 1:
                tpot_ms = (progress.last_s - progress.first_s) * 1e3 / (progress.generated - 1)
                self.recent_tpot_ms = _ewma(self.recent_tpot_ms, tpot_ms)

    def report(self, base: LoadReport) -> LoadReport:
        """`base` (the replica's identity) with the current load."""
        stats = self._stats
        total = (stats.cache_config.num_gpu_blocks or 0) if stats else 0
        return dataclasses.replace(
            base, running=self.running, waiting=stats.waiting if stats else 0,
            queued_prefill_tokens=self.queued_prefill_tokens, context_tokens=self.context_tokens,
            free_kv_blocks=round(total * (1.0 - stats.kv_usage)) if stats else 0, total_kv_blocks=total,
            block_size=stats.cache_config.block_size if stats else base.block_size,
            recent_ttft_ms=self.recent_ttft_ms, recent_tpot_ms=self.recent_tpot_ms)
