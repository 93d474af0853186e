"""Counts the bytes torch really copies, from outside the code under test: a dispatch mode sees
every tensor operation the calling thread runs, so a copy that code forgets to count shows up."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NOT_COPIES = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.lift_fresh.default}
"""Operations that allocate or wrap memory without moving bytes into it."""


def _nbytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CopyCounter(TorchDispatchMode):
    """`copied_bytes`: bytes written by `copy_` plus the outputs of every other operation that
    makes new data (views, allocations and metadata reads move none)."""

    def __init__(self):
        super().__init__()
        self.copied_bytes = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.copy_.default:
            self.copied_bytes += _nbytes(args[0])
        elif not func.is_view and func not in _NOT_COPIES:
            outputs = out if isinstance(out, (tuple, list)) else [out]
            moved = sum(_nbytes(o) for o in outputs)
            if moved:
                self.copied_bytes += moved
                self.ops.append(str(func))
        return out
