"""Which KV heads each tensor-parallel rank holds, and so which prefill ranks feed which decode ranks.

vLLM shards a layer's KV heads evenly over the TP ranks (rank r of T holds heads
[r*H/T, (r+1)*H/T)); with fewer heads than ranks it replicates them instead, which this
layer does not move (`check_shardable` refuses it). A prefill engine of TP size P and a
decode engine of TP size D may differ: every prefill rank pushes its own heads, as a part of
the transfer of its own, to each decode rank whose heads overlap them; each decode rank
takes from each part the heads it holds (re-sharded on the receiving side) and is done when
every part it needs is. With P == D that is one part per rank, rank to rank.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_shardable(total_heads: int, tp_size: int) -> None:
    """Raise ValueError unless `tp_size` ranks each hold an equal share of `total_heads` KV heads."""
    if tp_size < 1 or total_heads % tp_size:
        raise ValueError(f"KV transfer needs the model's {total_heads} KV heads split evenly over the "
                         f"tensor-parallel size {tp_size}; pick a TP size that divides {total_heads}")


def head_range(rank: int, tp_size: int, total_heads: int) -> tuple[int, int]:
    """[first, last) of the global KV heads rank `rank` of `tp_size` holds."""
    per = total_heads // tp_size
    return rank * per, (rank + 1) * per


@dataclass(frozen=True)
class HeadSlice:
    """The heads one part gives one receiving rank: `count` heads from index `src_first` of the
    part's own heads, written at index `dst_first` of the receiving rank's heads."""

    src_first: int
    dst_first: int
    count: int


def overlap(src_rank: int, src_tp: int, dst_rank: int, dst_tp: int, total_heads: int) -> HeadSlice | None:
    """What the part of prefill rank `src_rank` gives decode rank `dst_rank`; None: nothing."""
    s_lo, s_hi = head_range(src_rank, src_tp, total_heads)
    d_lo, d_hi = head_range(dst_rank, dst_tp, total_heads)
    lo, hi = max(s_lo, d_lo), min(s_hi, d_hi)
    return HeadSlice(lo - s_lo, lo - d_lo, hi - lo) if hi > lo else None


def destinations(src_rank: int, src_tp: int, dst_tp: int, total_heads: int) -> list[int]:
    """The decode ranks prefill rank `src_rank` pushes its part to."""
    return [d for d in range(dst_tp) if overlap(src_rank, src_tp, d, dst_tp, total_heads)]


def sources(dst_rank: int, dst_tp: int, src_tp: int, total_heads: int) -> dict[int, HeadSlice]:
    """The prefill ranks decode rank `dst_rank` needs a part from, with what it takes of each."""
    out = {}
    for s in range(src_tp):
        if (h := overlap(s, src_tp, dst_rank, dst_tp, total_heads)) is not None:
            out[s] = h
    return out


def part_id(transfer_id: str, src_rank: int, src_tp: int) -> str:
    """The id prefill rank `src_rank`'s part travels under: the transfer's own id from a
    one-worker prefill engine, so that TP 1 on both sides moves exactly as before."""
    return transfer_id if src_tp == 1 else f"{transfer_id}/tp{src_rank}"


def rank_addr(addr: str, rank: int) -> str:
    """The address rank `rank` of an engine listens on: the engine's advertised `host:port`
    (rank 0's) plus the rank, so one address names every rank."""
    host, _, port = addr.rpartition(":")
    return f"{host}:{int(port) + rank}" if rank else addr
