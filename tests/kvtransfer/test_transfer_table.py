"""TransferTable bookkeeping: completion rules, verification, staging budget and leases."""

from __future__ import annotations

import pytest

from pdserve.kvtransfer import framing
from pdserve.kvtransfer.fingerprint import KVFingerprint
from pdserve.kvtransfer.framing import checksum
from pdserve.kvtransfer.incoming import CHUNK_OVERHEAD_BYTES, TransferRefused, TransferState
from pdserve.kvtransfer.transfer import TransferTable
from pdserve.proto import kvtransfer_pb2 as pb

FP = KVFingerprint("m", "float32", block_size=4, kv_layout="cpu", num_layers=2, num_kv_heads=1, head_size=8)
BB = FP.block_bytes_per_layer  # 256 B
TOKENS, BLOCKS = 10, 3
NEED = BLOCKS * (BB + CHUNK_OVERHEAD_BYTES) * FP.num_layers


def make_table(budget: int = 1 << 20, max_lease_ms: int = 60_000) -> TransferTable:
    return TransferTable(FP, budget, max_lease_ms)


def open_msg(tid: str = "t", tokens: int = TOKENS, blocks: int = BLOCKS, lease_ms: int = 1000,
             first_block: int = 0) -> pb.TransferOpen:
    return pb.TransferOpen(transfer_id=tid, num_tokens=tokens, num_blocks=blocks, lease_ms=lease_ms,
                           first_block=first_block)


def chunk(layer: int, start: int, n: int, fill: int = 1, crc: int | None = None, size: int | None = None):
    payload = memoryview(bytes([(fill + layer * 7 + start) % 256]) * (n * BB if size is None else size))
    hdr = pb.ChunkHeader(transfer_id="t", layer=layer, block_start=start, num_blocks=n)
    hdr.crc32c = checksum([payload]) if crc is None else crc
    return hdr, payload, frame_bytes(hdr, payload)


def frame_bytes(hdr: pb.ChunkHeader, payload: memoryview) -> int:
    """What the chunk holds once staged: its whole frame, as a sender frames it."""
    return len(framing.encode(pb.KVFrame(chunk=hdr), [payload]))


def end_msg(chunks: int, nbytes: int) -> pb.TransferEnd:
    return pb.TransferEnd(transfer_id="t", num_chunks=chunks, total_bytes=nbytes)


FULL = [(1, 2, 1), (0, 0, 2), (0, 2, 1), (1, 0, 2)]  # (layer, start, n), out of order


def test_done_only_once_end_totals_match_and_every_block_arrived_end_first():
    table = make_table()
    t = table.open(open_msg(), now_s=0.0)
    assert table.open(open_msg(), now_s=0.1) is t
    assert table.reserved_bytes == NEED
    for layer, start, n in FULL[:3]:
        table.add_chunk(t, *chunk(layer, start, n))
    assert t.state is TransferState.TRANSFERRING
    table.end(t, end_msg(4, 6 * BB))
    assert t.state is TransferState.TRANSFERRING
    table.add_chunk(t, *chunk(*FULL[3]))
    assert t.state is TransferState.DONE
    assert t.staged_bytes == sum(chunk(*c)[2] for c in FULL) and t.covered_blocks(2) == BLOCKS
    snap = table.snapshot()
    assert snap["done"] == 1 and snap["opened"] == 1 and snap["chunks"] == 4 and snap["active"] == 0
    assert snap["reserved_bytes"] == NEED


def test_not_done_without_end_even_when_every_block_arrived():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    for c in FULL:
        table.add_chunk(t, *chunk(*c))
    assert t.state is TransferState.TRANSFERRING
    table.end(t, end_msg(4, 6 * BB))
    assert t.state is TransferState.DONE


def test_totals_that_match_but_miss_a_block_fail():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    for c in [(0, 0, 3), (1, 0, 2)]:
        table.add_chunk(t, *chunk(*c))
    table.end(t, end_msg(2, 5 * BB))
    assert t.state is TransferState.FAILED
    assert "only blocks [0, 2) of [0, 3)" in t.error
    assert table.reserved_bytes == 0


@pytest.mark.parametrize("chunks, nbytes", [(4, 6 * BB + 1), (3, 6 * BB), (2, 4 * BB)])
def test_totals_mismatch_fails_and_frees(chunks, nbytes):
    table = make_table()
    t = table.open(open_msg(), 0.0)
    for c in FULL:
        table.add_chunk(t, *chunk(*c))
    table.end(t, end_msg(chunks, nbytes))
    assert t.state is TransferState.FAILED and "totals" in t.error
    assert table.reserved_bytes == 0 and t.staged_bytes == 0 and not t.chunks


def test_checksum_mismatch_fails_frees_staging_and_raises_data_loss():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    table.add_chunk(t, *chunk(0, 0, 2))
    hdr, payload, held = chunk(1, 0, 2)
    hdr.crc32c ^= 1
    with pytest.raises(TransferRefused) as err:
        table.add_chunk(t, hdr, payload, held)
    assert err.value.code == "DATA_LOSS" and "checksum" in str(err.value)
    assert t.state is TransferState.FAILED and "checksum" in t.error
    assert table.reserved_bytes == 0 and t.staged_bytes == 0 and not t.chunks
    assert table.snapshot()["failed"] == 1 and table.snapshot()["staged_bytes"] == 0


@pytest.mark.parametrize(
    "layer, start, n, size, why",
    [
        (0, 0, 1, BB - 1, "payload"),
        (0, 0, 2, BB, "payload"),
        (2, 0, 1, None, "layer 2 out of range"),
        (-1, 0, 1, None, "layer -1 out of range"),
        (0, 2, 2, None, "outside"),
        (0, -1, 1, None, "outside"),
        (0, 3, 1, None, "outside"),
        (0, 0, 0, None, "outside"),
    ],
)
def test_malformed_chunks_are_refused_and_fail_the_transfer(layer, start, n, size, why):
    table = make_table()
    t = table.open(open_msg(), 0.0)
    with pytest.raises(TransferRefused, match=why):
        table.add_chunk(t, *chunk(layer, start, n, size=size))
    assert t.state is TransferState.FAILED and table.reserved_bytes == 0
    table.add_chunk(t, *chunk(0, 0, 1))
    assert not t.chunks and t.chunks_received == 1


@pytest.mark.parametrize("again", [(0, 0, 2, 50), (0, 1, 2, 1), (0, 1, 1, 1), (0, 0, 1, 1)],
                         ids=["same_range_other_bytes", "overlapping_tail", "inside", "same_start_fewer_blocks"])
def test_a_chunk_over_staged_blocks_fails_the_transfer_and_frees_its_staging(again):
    table = make_table()
    t = table.open(open_msg(), 0.0)
    table.add_chunk(t, *chunk(0, 0, 2, fill=1))
    with pytest.raises(TransferRefused, match="overlap"):
        table.add_chunk(t, *chunk(*again[:3], fill=again[3]))
    assert t.state is TransferState.FAILED and not t.chunks
    assert table.reserved_bytes == 0 and table.snapshot()["staged_bytes"] == 0


def test_a_chunk_frame_padded_beyond_its_payload_is_refused():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    hdr, payload, held = chunk(0, 0, 1)
    with pytest.raises(TransferRefused, match="holds more than its payload"):
        table.add_chunk(t, hdr, payload, payload.nbytes + CHUNK_OVERHEAD_BYTES + 1)
    assert t.state is TransferState.FAILED and table.reserved_bytes == 0


def test_what_a_transfer_stages_never_exceeds_its_reservation():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    for layer in range(FP.num_layers):
        table.add_chunk(t, *chunk(layer, 0, 1))
        table.add_chunk(t, *chunk(layer, 1, 2))
    assert t.staged_bytes <= t.reserved_bytes == NEED
    assert t.staged_bytes == sum(frame_bytes(*chunk(layer, s, n)[:2]) for layer in range(2) for s, n in [(0, 1), (1, 2)])


def test_byte_identical_duplicate_is_dropped_uncounted_and_the_transfer_still_completes():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    counted = [table.add_chunk(t, *chunk(*c)) for c in [FULL[0], FULL[0], FULL[1], FULL[2], FULL[0]]]
    assert counted == [True, False, True, True, False]
    held = sum(chunk(*c)[2] for c in FULL[:3])
    assert (t.chunks_received, t.bytes_received, t.staged_bytes) == (3, 4 * BB, held)
    table.end(t, end_msg(4, 6 * BB))
    assert table.add_chunk(t, *chunk(*FULL[3])) and t.state is TransferState.DONE
    snap = table.snapshot()
    assert (snap["chunks"], snap["bytes"], snap["duplicate_chunks"]) == (4, 6 * BB, 2)


def test_staging_budget_exceeded_is_refused_without_reserving():
    table = make_table(budget=NEED + NEED // 2)
    table.open(open_msg("a"), 0.0)
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg("b"), 0.0)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert table.reserved_bytes == NEED and table.state_of("b") is None
    table.discard("a", 0.1)
    assert table.reserved_bytes == 0
    table.open(open_msg("b"), 0.0)
    assert table.reserved_bytes == NEED


@pytest.mark.parametrize("tokens, blocks", [(10, 2), (10, 4), (0, 0), (-4, -1), (8, 3)])
def test_num_blocks_not_covering_num_tokens_is_invalid(tokens, blocks):
    table = make_table()
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg(tokens=tokens, blocks=blocks), 0.0)
    assert err.value.code == "INVALID_ARGUMENT"
    assert table.reserved_bytes == 0 and table.state_of("t") is None


def test_joining_stream_with_a_different_size_is_invalid():
    table = make_table()
    table.open(open_msg(), 0.0)
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg(tokens=13, blocks=4), 0.0)
    assert err.value.code == "INVALID_ARGUMENT" and table.reserved_bytes == NEED


def test_joining_a_failed_transfer_is_refused_and_take_returns_its_error():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    with pytest.raises(TransferRefused):
        table.add_chunk(t, *chunk(0, 0, 1, crc=0))
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg(), 0.0)
    assert err.value.code == "FAILED_PRECONDITION" and table.reserved_bytes == 0
    taken = table.take("t")
    assert taken is t and taken.state is TransferState.FAILED and "checksum" in taken.error


def _in_state(table: TransferTable, state: str):
    t = table.open(open_msg(lease_ms=1000), now_s=10.0)
    chunks = {"WAITING": [], "TRANSFERRING": FULL[:1], "DONE": FULL}[state]
    for c in chunks:
        table.add_chunk(t, *chunk(*c))
    if state == "DONE":
        table.end(t, end_msg(4, 6 * BB))
    assert t.state.name == state
    return t


@pytest.mark.parametrize("state", ["WAITING", "TRANSFERRING", "DONE"])
def test_lease_expiry_fails_the_transfer_frees_memory_and_later_drops_the_tombstone(state):
    table = make_table()
    t = _in_state(table, state)
    assert table.expire(10.9) == [] and t.state.name == state
    assert table.expire(11.01) == ["t"]
    assert t.state is TransferState.FAILED and "lease expired" in t.error
    assert table.reserved_bytes == 0 and t.staged_bytes == 0 and not t.chunks
    snap = table.snapshot()
    assert snap["expired"] == 1 and snap["reserved_bytes"] == 0 and snap["staged_bytes"] == 0
    assert table.expire(20.0) == [] and table.state_of("t") is TransferState.FAILED
    table.expire(11.0 + 61.0)
    assert table.state_of("t") is None


def test_lease_is_capped_by_max_lease_ms():
    table = make_table(max_lease_ms=500)
    t = table.open(open_msg(lease_ms=10_000_000), now_s=0.0)
    assert t.deadline_s == pytest.approx(0.5)
    assert table.expire(0.6) == ["t"]


def test_expired_placeholder_is_failed_even_if_never_opened():
    table = make_table()
    table.expect("t", deadline_s=5.0)
    assert table.state_of("t") is TransferState.WAITING
    assert table.expire(5.1) == ["t"]
    assert table.state_of("t") is TransferState.FAILED


def test_open_joins_the_expect_placeholder_and_keeps_its_deadline():
    table = make_table()
    table.expect("t", deadline_s=5.0)
    t = table.open(open_msg(lease_ms=60_000), now_s=1.0)  # the sender's lease does not extend the consumer's
    assert t.deadline_s == 5.0 and t.opened and t.reserved_bytes == NEED
    assert table.snapshot()["active"] == 1 and table.snapshot()["opened"] == 1


def test_a_staged_transfer_whose_consumer_comes_late_is_kept_for_the_consumers_lease():
    table = make_table()
    t = table.open(open_msg(lease_ms=1_000), now_s=0.0)  # pushed before any decode request expects it
    table.expect("t", deadline_s=30.0)  # the decode request, after the prefill engine's first token
    assert t.deadline_s == 30.0 and table.expire(2.0) == []
    table.expect("t", deadline_s=10.0)  # never shortened
    assert t.deadline_s == 30.0


def test_a_failed_transfer_is_not_revived_by_its_consumer():
    table = make_table()
    table.open(open_msg(lease_ms=1_000), now_s=0.0)
    assert table.expire(2.0) == ["t"]
    table.expect("t", deadline_s=30.0)
    assert table.state_of("t") is TransferState.FAILED and table.expire(3.0) == []


def test_open_of_an_expired_placeholder_is_refused():
    table = make_table()
    table.expect("t", deadline_s=1.0)
    table.expire(2.0)
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg(), now_s=2.5)
    assert err.value.code == "FAILED_PRECONDITION"


def test_open_of_an_expired_placeholder_leaks_no_staging_after_the_tombstone_goes():
    table = make_table()
    table.expect("t", deadline_s=1.0)
    table.expire(2.0)
    try:
        table.open(open_msg(), now_s=2.5)
    except TransferRefused:
        pass
    table.expire(1000.0)
    assert table.state_of("t") is None
    assert table.reserved_bytes == 0


def test_take_returns_only_terminal_transfers_and_removes_them():
    table = make_table()
    assert table.take("nope") is None
    t = table.open(open_msg(), 0.0)
    assert table.take("t") is None
    table.add_chunk(t, *chunk(0, 0, 3))
    assert table.take("t") is None
    table.add_chunk(t, *chunk(1, 0, 3))
    table.end(t, end_msg(2, 6 * BB))
    taken = table.take("t")
    assert taken is t and taken.state is TransferState.DONE
    assert len(taken.chunks) == 2 and taken.staged_bytes == chunk(0, 0, 3)[2] + chunk(1, 0, 3)[2]
    assert table.reserved_bytes == 0 and table.state_of("t") is None and table.take("t") is None


def test_discard_frees_a_transfer_and_leaves_a_tombstone_that_refuses_a_late_open():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    table.add_chunk(t, *chunk(0, 0, 2))
    table.discard("t", 0.5)
    table.discard("unknown", 0.5)
    assert table.reserved_bytes == 0 and t.staged_bytes == 0
    assert table.state_of("t") is table.state_of("unknown") is TransferState.FAILED
    assert table.snapshot()["active"] == 0 and table.snapshot()["failed"] == 0  # nothing went wrong
    for tid in ("t", "unknown"):
        with pytest.raises(TransferRefused, match="discarded"):
            table.open(open_msg(tid), 0.6)
    table.expire(0.5 + 61.0)
    assert table.state_of("t") is None and table.state_of("unknown") is None


@pytest.mark.parametrize("tid", ["", "x" * 129, "é" * 65])
def test_transfer_ids_beyond_128_bytes_or_empty_are_refused(tid):
    table = make_table()
    with pytest.raises(TransferRefused, match="1 to 128 bytes") as err:
        table.open(open_msg(tid), 0.0)
    assert err.value.code == "INVALID_ARGUMENT" and table.reserved_bytes == 0


def test_tombstones_beyond_the_table_bound_go_oldest_first_and_live_transfers_stay():
    table = TransferTable(FP, 1 << 20, 60_000, max_transfers=4)
    live = table.open(open_msg("live"), 0.0)
    for i in range(10):
        table.cancel(f"gone-{i}", "cancelled", 0.0)
    assert table.state_of("live") is live.state is TransferState.WAITING
    assert [table.state_of(f"gone-{i}") for i in (6, 7, 8, 9)] == [None, TransferState.FAILED, TransferState.FAILED,
                                                                   TransferState.FAILED]
    assert table.snapshot()["evicted_tombstones"] == 7
    table.open(open_msg("second"), 0.0)
    with pytest.raises(TransferRefused) as err:
        for i in range(4):
            table.open(open_msg(f"more-{i}"), 0.0)
    assert err.value.code == "RESOURCE_EXHAUSTED" and table.state_of("live") is TransferState.WAITING


def test_cancel_frees_an_arriving_transfer_and_refuses_its_late_streams():
    table = make_table()
    t = table.open(open_msg(), 0.0)
    table.add_chunk(t, *chunk(0, 0, 2))
    table.cancel("t", "not needed", 0.5)
    assert t.state is TransferState.FAILED and table.reserved_bytes == 0 and t.staged_bytes == 0
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg(), 0.6)
    assert err.value.code == "FAILED_PRECONDITION" and "not needed" in str(err.value)


def test_cancel_before_the_transfer_arrives_refuses_it_without_reserving_and_is_forgotten_later():
    table = make_table()
    table.cancel("t", "decode request ended", 1.0)
    with pytest.raises(TransferRefused):
        table.open(open_msg(), 1.1)
    assert table.reserved_bytes == 0
    table.expire(1.0 + 61.0)
    assert table.state_of("t") is None

