"""A transfer that leaves out the leading blocks its receiver's prefix cache holds
(`TransferOpen.first_block`): what it reserves, when it is done, and what is refused."""

from __future__ import annotations

import pytest

from pdserve.kvtransfer.incoming import TransferRefused, TransferState
from pdserve.proto import kvtransfer_pb2 as pb
from tests.kvtransfer.test_transfer_table import BB, BLOCKS, NEED, chunk, make_table, open_msg


def test_a_transfer_leaving_out_leading_blocks_reserves_and_completes_with_the_rest_only():
    table = make_table()
    t = table.open(open_msg(first_block=1), 0.0)
    assert table.reserved_bytes == NEED * 2 // 3  # blocks 1 and 2 of 3
    with pytest.raises(TransferRefused):  # the receiver holds block 0: a sender sending it anyway is hostile
        table.add_chunk(t, *chunk(0, 0, 2))
    assert t.state is TransferState.FAILED and table.reserved_bytes == 0
    t = table.open(open_msg("u", first_block=1), 0.0)
    for layer in (0, 1):
        hdr, payload, nbytes = chunk(layer, 1, 2)
        hdr.transfer_id = "u"
        table.add_chunk(t, hdr, payload, nbytes)
    table.end(t, pb.TransferEnd(transfer_id="u", num_chunks=2, total_bytes=4 * BB))
    assert t.state is TransferState.DONE and t.covered_blocks(2) == BLOCKS


@pytest.mark.parametrize("first_block", [-1, BLOCKS, BLOCKS + 5])
def test_a_first_block_outside_the_transfer_is_invalid(first_block):
    table = make_table()
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg(first_block=first_block), 0.0)
    assert err.value.code == "INVALID_ARGUMENT" and table.reserved_bytes == 0


def test_joining_stream_with_a_different_first_block_is_invalid():
    table = make_table()
    table.open(open_msg(), 0.0)
    with pytest.raises(TransferRefused) as err:
        table.open(open_msg(first_block=1), 0.0)
    assert err.value.code == "INVALID_ARGUMENT" and table.reserved_bytes == NEED
