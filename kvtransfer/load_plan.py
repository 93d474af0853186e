"""What a decode rank does with a finished transfer's parts, as pure functions: whether they can
be loaded, the pieces that land in its cache (of each part, the KV heads it holds), and the report
of the load for vLLM and the answer."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.kvtransfer.block_layout import BlockLayout, LoadPiece
from pdserve.kvtransfer.connector_meta import LoadJob, TransferReport
from pdserve.kvtransfer.incoming import IncomingTransfer
from pdserve.kvtransfer.tp_shards import sources


def parts_error(job: LoadJob, parts: dict[int, IncomingTransfer], part_block_bytes: int) -> str:
    """Why the parts cannot be loaded ("": they can): a part failed, carries another prompt length,
    or blocks of another share of the heads than a prefill of the job's TP size sends
    (`part_block_bytes` per block of a layer)."""
    return "; ".join(e for t in parts.values() if (e := _part_error(job, t, part_block_bytes)))


def _part_error(job: LoadJob, t: IncomingTransfer, part_block_bytes: int) -> str:
    if t.error:
        return t.error
    if t.num_tokens != job.num_tokens:
        return f"prefill sent {t.num_tokens} prompt tokens, decode expects {job.num_tokens}"
    if t.block_bytes != part_block_bytes:
        return (f"part {t.transfer_id} carries {t.block_bytes} B blocks, a prefill of TP size {job.src_tp} "
                f"sends {part_block_bytes} B")
    return ""


def load_pieces(job: LoadJob, parts: dict[int, IncomingTransfer], layers: Sequence[BlockLayout], tp_rank: int,
                tp_size: int, total_kv_heads: int) -> list[LoadPiece]:
    """Every staged chunk of every part (by sending rank) that covers the job's blocks, with the
    heads it gives this rank (None where a part holds exactly this rank's heads)."""
    last = job.first_block + len(job.block_ids)
    src_heads = total_kv_heads // job.src_tp
    own_heads = total_kv_heads // tp_size
    takes = sources(tp_rank, tp_size, job.src_tp, total_kv_heads)
    pieces = []
    for rank, t in parts.items():
        heads = None if src_heads == takes[rank].count == own_heads else takes[rank]
        for chunk in t.chunks.values():
            lo, hi = chunk.block_start, chunk.block_start + chunk.num_blocks
            if hi <= job.first_block or lo >= last:
                continue
            ids = [job.block_ids[b - job.first_block] if job.first_block <= b < last else None for b in range(lo, hi)]
            pieces.append(LoadPiece(layers[chunk.layer], ids, chunk.payload, heads, src_heads))
    return pieces


def load_report(job: LoadJob, parts: Sequence[IncomingTransfer], error: str, written: int, load_ms: float,
                ready_ns: int) -> TransferReport:
    """How the load went: prefill time from the earliest part's start to the latest part's end, and
    what of the transfer was exposed after it."""
    c_start = min((t.compute_ns[0] for t in parts), default=0)
    c_end = max(t.compute_ns[1] for t in parts) if parts and all(t.compute_ns[1] for t in parts) else 0
    return TransferReport(
        transfer_id=job.transfer_id,
        state="FAILED" if error else "DONE",
        tokens=0 if error else job.num_tokens,
        bytes=written,
        error=error,
        prefill_compute_ms=(c_end - c_start) / 1e6 if c_end else 0.0,
        exposed_ms=(ready_ns - c_end) / 1e6 if c_end and not error else 0.0,
        load_ms=load_ms,
        trace_parent=parts[0].trace_parent if parts else "",
        start_unix_ns=c_start,
        ready_unix_ns=ready_ns,
    )
