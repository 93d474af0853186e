"""Scheduler side of GrpcKVConnector: plans sends and loads, never touches KV bytes."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pdserve.kvtransfer import params as kvparams
from pdserve.kvtransfer.connector_meta import (
    GrpcConnectorMetadata,
    GrpcWorkerMetadata,
    LoadJob,
    SendJob,
    TransferReport,
)
from pdserve.kvtransfer.tp_shards import part_id

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class SchedulerSide:
    """Per-request bookkeeping in the engine core: which blocks to push or load each step."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.kv_cache_manager: KVCacheManager | None = None
        self._sending: dict[str, tuple[Request, kvparams.SendParams]] = {}
        self._next_block: dict[str, int] = {}
        """Per pushing request, its first block not pushed yet (absent: none pushed)."""
        self._loads: list[LoadJob] = []
        self._cancels: dict[str, str] = {}
        self._load_decided: set[str] = set()  # decode requests whose load was planned or cancelled
        self._reports: dict[str, TransferReport] = {}
        self._malformed: set[str] = set()

    def _params(self, request: Request) -> kvparams.SendParams | kvparams.RecvParams | None:
        """The request's params; malformed ones cost that request its transfer (its KV is
        computed locally), never the engine."""
        try:
            return kvparams.parse(request.kv_transfer_params)
        except ValueError as exc:
            if request.request_id not in self._malformed:
                self._malformed.add(request.request_id)
                log.warning("request %s: ignoring malformed kv_transfer_params: %s", request.request_id, exc)
            return None

    def _blocks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _skipped_blocks(self, n_tokens: int, skip_tokens: int) -> int:
        """Leading blocks of an `n_tokens` transfer left out for `skip_tokens` the receiver holds:
        whole blocks only, and never the last (a transfer carries at least one block)."""
        return min(skip_tokens // self.block_size, self._blocks(n_tokens) - 1)

    # --- decode (consumer) ------------------------------------------------
    def _kv_tokens(self, request: Request, p: kvparams.RecvParams) -> int:
        """The prompt tokens whose KV arrives: all, or the `kv_tokens` first (the prefill engine
        sampled the token that follows them); 0 for a count beyond the prompt, which no honest
        caller sends (the request computes its whole prompt here)."""
        if p.kv_tokens is None:
            return request.num_prompt_tokens
        if p.kv_tokens > request.num_prompt_tokens:
            if request.request_id not in self._malformed:
                self._malformed.add(request.request_id)
                log.warning("request %s: kv_tokens %d exceeds its %d prompt tokens; computing the prompt here",
                            request.request_id, p.kv_tokens, request.num_prompt_tokens)
            return 0
        return p.kv_tokens

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        p = self._params(request)
        if not isinstance(p, kvparams.RecvParams) or request.request_id in self._load_decided:
            return 0, False
        n = self._kv_tokens(request, p)
        remote = n - num_computed_tokens
        held = self._skipped_blocks(n, p.skip_tokens) * self.block_size if n else 0
        if remote > 0 and num_computed_tokens < held:
            # Routing expected this engine to hold more than it does (evicted since, or a lost
            # cache event): the transfer lacks blocks this request needs, so it computes its prompt.
            self._load_decided.add(request.request_id)
            self._cancel(p, f"the transfer leaves out {held} tokens, the prefix cache holds "
                                        f"{num_computed_tokens}: computing the prompt here")
            return 0, False
        return (remote, True) if remote > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        p = self._params(request)
        if isinstance(p, kvparams.SendParams):
            self._sending[request.request_id] = (request, p)
            return
        if not isinstance(p, kvparams.RecvParams) or request.request_id in self._load_decided:
            return
        self._load_decided.add(request.request_id)
        if num_external_tokens == 0:
            self._cancel(p, "decode had the whole prompt cached")
            return
        n = self._kv_tokens(request, p)
        first = (n - num_external_tokens) // self.block_size
        (block_ids,) = blocks.get_block_ids()
        job = LoadJob(request.request_id, p.transfer_id, p.lease_ms, n, first, list(block_ids[first : self._blocks(n)]),
                      p.src_tp)
        log.debug("load plan %s: transfer %s blocks %d..%d", job.req_id, job.transfer_id, first, self._blocks(n))
        self._loads.append(job)

    # --- prefill (producer) -----------------------------------------------
    def _send_jobs(self, out: SchedulerOutput) -> list[SendJob]:
        assert self.kv_cache_manager is not None
        jobs = []
        for req_id, n_sched in out.num_scheduled_tokens.items():
            entry = self._sending.get(req_id)
            if entry is None:
                continue
            request, p = entry
            n = request.num_prompt_tokens
            start = request.num_computed_tokens  # before this step (vLLM advances it after)
            end = min(start + n_sched, n)
            if start >= n:
                continue
            # Pushes start at the first block the receiver lacks (`skip_tokens`), and the first one also
            # carries blocks that came from the local prefix cache. A block this step leaves partly
            # computed goes with the step that completes it: the receiver takes every block once (a
            # chunk ends mid-block when decodes share the step's token budget).
            first = self._next_block.get(req_id, self._skipped_blocks(n, p.skip_tokens))
            last = self._blocks(end) if end == n else end // self.block_size
            if last <= first:
                continue
            (block_ids,) = self.kv_cache_manager.get_block_ids(req_id)
            jobs.append(
                SendJob(req_id, p.transfer_id, p.dest, p.lease_ms, n, first, list(block_ids[first:last]), end == n,
                        p.trace_parent, p.dest_tp)
            )
            self._next_block[req_id] = last
        return jobs

    def _cancel(self, p: kvparams.RecvParams, reason: str) -> None:
        """Every part of the transfer (one per prefill TP rank); each decode rank refuses those it
        would have taken."""
        log.info("KV transfer %s not needed: %s", p.transfer_id, reason)
        for rank in range(p.src_tp):
            self._cancels[part_id(p.transfer_id, rank, p.src_tp)] = reason

    def build_connector_meta(self, out: SchedulerOutput) -> GrpcConnectorMetadata:
        meta = GrpcConnectorMetadata(sends=self._send_jobs(out), loads=self._loads, cancels=self._cancels)
        self._loads, self._cancels = [], {}
        return meta

    # --- both ---------------------------------------------------------------
    def update_connector_output(self, worker_meta: GrpcWorkerMetadata | None) -> None:
        if worker_meta is None:
            return
        for req_id, report in worker_meta.reports.items():
            if req_id in self._load_decided:  # ignore requests that already went away
                # Tensor-parallel ranks may finish a load in different steps: one report of all.
                earlier = self._reports.get(req_id)
                self._reports[req_id] = earlier.merge(report) if earlier is not None else report

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._sending.pop(req_id, None)
        sent = self._next_block.pop(req_id, None) is not None
        p = self._params(request)
        self._malformed.discard(req_id)
        if isinstance(p, kvparams.RecvParams) and req_id not in self._load_decided:
            self._cancel(p, "the decode request ended before it was scheduled")
        self._load_decided.discard(req_id)
        if p is None:
            return False, None
        report = self._reports.pop(req_id, None)
        out: dict[str, Any] = {"op": "send" if isinstance(p, kvparams.SendParams) else "recv", "transfer_id": p.transfer_id}
        if report is not None:
            out.update(asdict(report))
        # A producer keeps its blocks until the worker reports the push finished.
        return sent, {kvparams.KEY: out}
