"""One MoE layer in buffered mode: every expert in host memory, `slots` of them in device memory.

Tensors keep the kernel's own layout (vLLM's CPU kernel prepacks each expert's weights in
place, so an expert is still one row of the first dimension):
- `host_w13` (E, 2*I, H), `host_w2` (E, H, I): all experts, pinned when the device is a GPU;
- `w13` (S, 2*I, H), `w2` (S, H, I): the slots the fused-MoE kernel runs on, with routing
  remapped from expert ids to slot ids.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import torch

from pdserve.config.experts import ExpertBufferConfig
from pdserve.experts.counters import LayerCounters
from pdserve.experts.eviction import SlotTable, commit, plan_loads, plan_prefetch, split_rounds, touch

# How often (in steps) the local popularity ranking used for prefetch is refreshed: reading
# the counts back from the device is a synchronisation, too dear for every step.
_RANK_EVERY_STEPS = 32


class ExpertBuffer:
    def __init__(self, index: int, host_w13: torch.Tensor, host_w2: torch.Tensor, config: ExpertBufferConfig,
                 device: torch.device, top_k: int):
        num_experts = host_w13.shape[0]
        if not config.slots <= num_experts:
            raise ValueError(f"expert buffer of layer {index}: {config.slots} slots for {num_experts} experts; "
                             f"use at most {num_experts} (that many is all experts resident)")
        self.config, self.num_experts, self.top_k = config, num_experts, top_k
        self.host_w13, self.host_w2 = host_w13, host_w2
        self.w13 = torch.empty((config.slots, *host_w13.shape[1:]), dtype=host_w13.dtype, device=device)
        self.w2 = torch.empty((config.slots, *host_w2.shape[1:]), dtype=host_w2.dtype, device=device)
        self.expert_bytes = host_w13[0].nbytes + host_w2[0].nbytes
        self.table = SlotTable.empty(config.slots)
        self.slot_of = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.hot: frozenset[int] = frozenset()
        self.counters = LayerCounters()
        self._activations = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self._ranking: list[int] = list(range(num_experts))
        self.next: ExpertBuffer | None = None
        """The following MoE layer's buffer, the one prefetch fills."""
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._in_flight: dict[int, torch.cuda.Event] = {}
        self._load(list(enumerate(range(config.slots))))  # start full: the first step pays no misses
        self.counters = LayerCounters()  # that fill is part of installing, not of serving

    @property
    def slot_bytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def plan(self, topk_ids: torch.Tensor) -> list[tuple[list[int] | None, list[int]]]:
        """Rounds of `(token indices, experts)` for this batch: one round of every token (None)
        unless the batch needs more experts than there are slots. Counts the hits."""
        self._activations += torch.bincount(topk_ids.flatten(), minlength=self.num_experts)
        needed = torch.unique(topk_ids).tolist()
        resident = self.table.slot_of()
        self.counters.hits += sum(1 for e in needed if e in resident)
        self.counters.tokens += topk_ids.shape[0]
        if len(needed) <= self.config.slots:
            return [(None, needed)]
        return list(split_rounds(topk_ids.tolist(), resident, self.config.slots))

    def admit(self, experts: list[int], topk_ids: torch.Tensor) -> torch.Tensor:
        """Make `experts` resident (each load is a miss); `topk_ids` remapped to their slots."""
        loads = plan_loads(self.table, experts, self.config.policy, self.hot)
        self.counters.misses += len(loads)
        self._load(loads)
        self._wait_for(experts)
        touch(self.table, experts)
        return self.slot_of[topk_ids.long()].to(topk_ids.dtype)

    def prefetch_next(self) -> None:
        """Start loading the next layer's likely experts on the copy stream (GPU only)."""
        nxt = self.next
        if nxt is None or self._stream is None or not self.config.prefetch or not self.config.prefetch_max:
            return
        likely = sorted(nxt.hot) or nxt.ranking()
        loads = plan_prefetch(nxt.table, likely, self.config.prefetch_max, self.config.policy, nxt.hot)
        nxt.counters.prefetched += len(loads)
        nxt._load(loads)

    def ranking(self) -> list[int]:
        """Experts by how often this layer used them, refreshed every few steps."""
        if self.table.clock % _RANK_EVERY_STEPS == 0:
            self._ranking = torch.argsort(self._activations, descending=True, stable=True).tolist()
        return self._ranking

    def set_hot(self, hot: Collection[int]) -> None:
        self.hot = frozenset(e for e in hot if 0 <= e < self.num_experts)

    def activations(self) -> list[int]:
        return self._activations.tolist()

    def reset_counters(self) -> None:
        self.counters = LayerCounters()
        self._activations.zero_()

    def _load(self, loads: list[tuple[int, int]]) -> None:
        if not loads:
            return
        if self._stream is None:
            start = time.perf_counter()
            for slot, expert in loads:
                self.w13[slot].copy_(self.host_w13[expert])
                self.w2[slot].copy_(self.host_w2[expert])
            self.counters.stall_s += time.perf_counter() - start
        else:
            # The slot may still be read by a kernel queued earlier on the compute stream.
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for slot, expert in loads:
                    self.w13[slot].copy_(self.host_w13[expert], non_blocking=True)
                    self.w2[slot].copy_(self.host_w2[expert], non_blocking=True)
                    self._in_flight[slot] = torch.cuda.Event()
                    self._in_flight[slot].record(self._stream)
        for slot, expert in loads:
            self.slot_of[expert] = slot
        self.counters.bytes_moved += len(loads) * self.expert_bytes
        commit(self.table, loads)

    def _wait_for(self, group: list[int]) -> None:
        """Wait (on the host) for copies still running into the slots `group` uses; the time
        waited is stall."""
        if not self._in_flight:
            return
        slots = self.table.slot_of()
        start = time.perf_counter()
        for expert in group:
            event = self._in_flight.pop(slots[expert], None)
            if event is not None:
                event.synchronize()
        self.counters.stall_s += time.perf_counter() - start
