"""Where a logical run of KV blocks lives inside one layer's paged cache tensor.

vLLM backends keep the block index in dim 0 (CPU: `(num_blocks, kv_heads,
block_size, 2*head_size)`) or dim 1 (GPU flash-attn: `(2, num_blocks,
block_size, kv_heads, head_size)`). A block's bytes are contiguous per leading
slice, so whole blocks move as a few contiguous views: no per-token slicing,
and no dependence on the layout inside a block.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from pdserve.kvtransfer.tp_shards import HeadSlice


def contiguous_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Group physical block ids into (first_id, count) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


class BlockLayout:
    """Reads and writes whole blocks of one layer's cache tensor as raw bytes."""

    def __init__(self, kv_layer: torch.Tensor, num_blocks: int):
        if not kv_layer.is_contiguous():
            raise ValueError("KV cache tensor must be contiguous")
        if kv_layer.shape[0] == num_blocks:
            self.block_dim = 0
        elif kv_layer.dim() > 1 and kv_layer.shape[1] == num_blocks and kv_layer.shape[0] == 2:
            self.block_dim = 1
        else:
            raise ValueError(f"cannot find the block dim ({num_blocks} blocks) in KV shape {tuple(kv_layer.shape)}")
        self.kv = kv_layer
        self.on_cpu = kv_layer.device.type == "cpu"
        self.block_shape = kv_layer.shape[self.block_dim + 1 :]
        self.heads_dim = 0 if self.block_dim == 0 else len(self.block_shape) - 2
        """The KV heads' dimension within a block (CPU: first; GPU: before the head size)."""
        self.block_bytes = kv_layer[0].numel() * kv_layer.element_size() if self.block_dim == 0 else (
            2 * kv_layer[0, 0].numel() * kv_layer.element_size()
        )

    def slices(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """Tensor slices in payload order: blocks in order; with a leading K/V
        dim, all K blocks then all V blocks. Independent of how ids group into runs,
        so sender and receiver agree whatever their physical block ids."""
        runs = contiguous_runs(block_ids)
        if self.block_dim == 0:
            return [self.kv[f : f + n] for f, n in runs]
        return [self.kv[kv, f : f + n] for kv in (0, 1) for f, n in runs]

    def read(self, block_ids: Sequence[int]) -> list[memoryview]:
        """Views of `block_ids`' bytes in payload order, in place: a CPU cache only (a device
        cache's blocks leave through `LayerStager`, off the forward's stream)."""
        if not self.on_cpu:
            raise ValueError(f"read() views a CPU cache in place; a {self.kv.device} cache is read by LayerStager")
        return host_views(self.slices(block_ids))

    @property
    def num_heads(self) -> int:
        return int(self.block_shape[self.heads_dim])

    def write(self, block_ids: Sequence[int | None], payload: memoryview, heads: HeadSlice | None = None,
              src_heads: int = 0) -> int:
        """Copy a payload made by the peer's `read` of len(block_ids) blocks into
        `block_ids` (None: skip that block, e.g. it is already cached here).
        With `heads`, the peer's blocks hold `src_heads` KV heads (another tensor-parallel
        share) and only `heads` of them are copied, to their place here.
        Returns the bytes copied."""
        n = len(block_ids)
        block_bytes = self.block_bytes if heads is None else self.block_bytes // self.num_heads * src_heads
        if payload.nbytes != n * block_bytes:
            raise ValueError(f"payload has {payload.nbytes} B, {n} blocks hold {n * block_bytes} B")
        with warnings.catch_warnings():
            # gRPC hands us read-only bytes; this tensor is only ever read.
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(payload, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        halves = [src] if self.block_dim == 0 else [src[: src.numel() // 2], src[src.numel() // 2 :]]
        per_block = block_bytes // len(halves)
        copied = 0
        for pos, first, count in _positioned_runs(block_ids):
            for h, half in enumerate(halves):
                dst = self.kv[first : first + count] if self.block_dim == 0 else self.kv[h, first : first + count]
                piece = half[pos * per_block : (pos + count) * per_block].view(dst.dtype)
                if heads is None:
                    dst.copy_(piece.view(dst.shape), non_blocking=not self.on_cpu)
                    copied += piece.numel() * piece.element_size()
                    continue
                dim = 1 + self.heads_dim
                shape = (*dst.shape[:dim], src_heads, *dst.shape[dim + 1 :])
                part = piece.view(shape).narrow(dim, heads.src_first, heads.count)
                dst.narrow(dim, heads.dst_first, heads.count).copy_(part, non_blocking=not self.on_cpu)
                copied += part.numel() * part.element_size()
        return copied


class LoadPiece(NamedTuple):
    """A received payload (one chunk: one layer's run of blocks) and where it lands in the cache."""

    layout: BlockLayout
    block_ids: Sequence[int | None]
    """Physical blocks, one per block of the payload (None: held here already, skipped)."""
    payload: memoryview
    heads: HeadSlice | None = None
    """Where the payload holds another tensor-parallel share of the heads: which of them land here."""
    src_heads: int = 0
    """The payload's heads per block, with `heads`."""

    def write(self) -> int:
        return self.layout.write(self.block_ids, self.payload, self.heads, self.src_heads)


def host_views(tensors: Sequence[torch.Tensor]) -> list[memoryview]:
    """The bytes of contiguous host tensors, as flat memoryviews (no copy)."""
    return [memoryview(t.view(torch.uint8).numpy()).cast("B") for t in tensors]


def _positioned_runs(block_ids: Sequence[int | None]) -> list[tuple[int, int, int]]:
    """(position in list, first physical id, count) for runs of consecutive ids, skipping None."""
    runs: list[tuple[int, int, int]] = []
    for pos, b in enumerate(block_ids):
        if b is None:
            continue
        if runs and runs[-1][0] + runs[-1][2] == pos and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, b, 1))
    return runs
