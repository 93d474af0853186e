"""The KV receiver against streams that break the Push protocol, over real gRPC on 127.0.0.1:
cut streams, replayed and reordered chunks, frames naming another transfer. Each is refused or
dropped; a transfer pushed alongside still arrives DONE with identical bytes, and once the broken
transfer's lease has run out the receiver holds no staging memory."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import grpc
import pytest
import torch

from pdserve.kvtransfer import framing
from pdserve.kvtransfer.auth import SECRET_METADATA_KEY
from pdserve.kvtransfer.block_layout import BlockLayout
from pdserve.kvtransfer.incoming import TransferState
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.rpc import SERVICE
from pdserve.kvtransfer.sender import KVSender, OutgoingTransfer
from pdserve.proto import kvtransfer_pb2 as pb
from tests.kvtransfer import test_transport
from tests.kvtransfer.test_transport import BB, BS, FP, SECRET, WAIT_S, assert_arrived, caches, raw_push, reservation

made, make_receiver, make_sender = test_transport.made, test_transport.make_receiver, test_transport.make_sender
"""The transport tests' fixtures: receivers and senders on 127.0.0.1, stopped after the test."""

SHORT_LEASE_MS = 1000
"""Lease of the broken transfers: short, so the tests see their staging freed. (A slow machine may
reach it before a test looks at the broken transfer, which is why the tests check it is not DONE
rather than still TRANSFERRING.)"""


def transfer_frames(tid: str, src: list[torch.Tensor], ids: list[int], epoch: str,
                    lease_ms: int = 10_000) -> tuple[bytes, list[bytes], bytes]:
    """The open frame, one chunk frame per (layer, block) in order, and the end frame of a
    transfer of blocks `ids` of `src`, as a sender that handshook for `epoch` would frame them."""
    msg = pb.TransferOpen(transfer_id=tid, fingerprint=FP.to_proto(), num_tokens=len(ids) * BS, num_blocks=len(ids),
                          lease_ms=lease_ms, epoch=epoch)
    chunks = []
    for layer, kv in enumerate(src):
        lay = BlockLayout(kv, kv.shape[0])
        for i, block in enumerate(ids):
            parts = lay.read([block])
            hdr = pb.ChunkHeader(transfer_id=tid, layer=layer, block_start=i, num_blocks=1,
                                 crc32c=framing.checksum(parts))
            chunks.append(framing.encode(pb.KVFrame(chunk=hdr), parts))
    end = pb.TransferEnd(transfer_id=tid, num_chunks=len(chunks), total_bytes=len(chunks) * BB)
    return framing.encode(pb.KVFrame(open=msg)), chunks, framing.encode(pb.KVFrame(end=end))


def foreign_chunk(tid: str, fill: int = 7) -> bytes:
    """A well-formed one-block chunk of layer 0, block 0 for `tid`, with bytes no sender here sends."""
    payload = [memoryview(bytes([fill]) * BB)]
    hdr = pb.ChunkHeader(transfer_id=tid, layer=0, block_start=0, num_blocks=1, crc32c=framing.checksum(payload))
    return framing.encode(pb.KVFrame(chunk=hdr), payload)


async def until(cond: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Wait for `cond` without blocking this loop (it may be sending the frames that make it true)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def start_good_transfer(tx: KVSender, rx: KVReceiver, src: list[torch.Tensor],
                              ids: list[int]) -> OutgoingTransfer:
    """A transfer from the real sender whose first layer (one chunk) the receiver has staged;
    the caller finishes it."""
    good = tx.open("good", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    good.send_chunk(0, 0, len(ids), BlockLayout(src[0], src[0].shape[0]).read(ids))
    await until(lambda: rx.table.state_of("good") is TransferState.TRANSFERRING)
    return good


def finish_good_transfer(good: OutgoingTransfer, rx: KVReceiver, src: list[torch.Tensor], ids: list[int]) -> None:
    """Send the rest of the good transfer and check it arrived DONE with identical bytes."""
    for layer in range(1, FP.num_layers):
        good.send_chunk(layer, 0, len(ids), BlockLayout(src[layer], src[layer].shape[0]).read(ids))
    good.finish()
    res = good.result.result(WAIT_S)
    assert res.state is TransferState.DONE, res.error
    assert_arrived(rx, "good", src, ids)


async def assert_staging_freed_at_lease_expiry(rx: KVReceiver, tid: str) -> None:
    await until(lambda: rx.table.state_of(tid) is TransferState.FAILED)
    assert "lease expired" in rx.table.take(tid).error
    assert rx.stats()["reserved_bytes"] == 0 and rx.stats()["staged_bytes"] == 0


@pytest.mark.parametrize("cut", ["half_closed", "cancelled"])
async def test_a_push_cut_before_its_end_never_completes_and_its_lease_frees_its_staging(
    make_receiver, make_sender, cut
):
    rx, tx = make_receiver(), make_sender()
    src, ids = caches(4, seed=10), [2, 0, 3]
    good = await start_good_transfer(tx, rx, src, ids)
    opening, chunks, _ = transfer_frames("cut", caches(3, seed=11), [0, 1, 2], rx.epoch, lease_ms=SHORT_LEASE_MS)
    if cut == "half_closed":  # the client ends its side of the stream without the end frame
        ack = await raw_push(rx.address, [opening, *chunks[:4]])
        assert (ack.state, ack.chunks_received) == (pb.TRANSFERRING, 4)
    else:  # the client goes away mid-stream
        async with grpc.aio.insecure_channel(rx.address) as ch:
            push = ch.stream_unary(f"/{SERVICE}/Push", request_serializer=None, response_deserializer=None)
            never = asyncio.Event()

            async def frames():
                for frame in (opening, *chunks[:4]):
                    yield frame
                await never.wait()

            call = push(frames(), metadata=((SECRET_METADATA_KEY, SECRET),), timeout=WAIT_S)
            await until(lambda: rx.stats()["chunks"] == 1 + 4)  # good's first chunk and cut's four
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
    assert rx.table.state_of("cut") is not TransferState.DONE
    finish_good_transfer(good, rx, src, ids)
    await assert_staging_freed_at_lease_expiry(rx, "cut")


async def test_chunks_out_of_order_over_two_streams_with_the_end_first_complete_done_with_identical_bytes(
    make_receiver,
):
    rx = make_receiver()
    src, ids = caches(6, seed=12), [5, 1, 4, 0]
    opening, chunks, end = transfer_frames("ooo", src, ids, rx.epoch)
    random.Random(12).shuffle(chunks)
    half = len(chunks) // 2
    ack_a, ack_b = await asyncio.gather(raw_push(rx.address, [opening, end, *chunks[:half]]),
                                        raw_push(rx.address, [opening, *chunks[half:]]))
    assert ack_a.state == pb.DONE, ack_a.error
    assert ack_a.chunks_received + ack_b.chunks_received == len(chunks) == 2 * len(ids)
    assert_arrived(rx, "ooo", src, ids)
    assert rx.stats()["reserved_bytes"] == 0


async def test_a_replayed_chunk_is_dropped_uncounted_and_the_transfer_completes_with_identical_bytes(
    make_receiver,
):
    rx = make_receiver()
    src, ids = caches(4, seed=13), [3, 1, 2]
    opening, chunks, end = transfer_frames("replayed", src, ids, rx.epoch)
    # One stream after the other, each replaying before the end frame: a replay that reaches a
    # transfer already DONE is dropped without being looked at, so it would not be counted.
    ack_a = await raw_push(rx.address, [opening, chunks[0], chunks[0], *chunks[1:4], chunks[2]])
    ack_b = await raw_push(rx.address, [opening, chunks[4], chunks[0], chunks[5], chunks[5], end])
    assert (ack_a.state, ack_b.state) == (pb.TRANSFERRING, pb.DONE), ack_b.error
    assert ack_a.chunks_received + ack_b.chunks_received == len(chunks)
    stats = rx.stats()
    assert (stats["chunks"], stats["bytes"], stats["duplicate_chunks"]) == (len(chunks), len(chunks) * BB, 4)
    assert_arrived(rx, "replayed", src, ids)
    assert rx.stats()["reserved_bytes"] == 0


async def test_a_replayed_chunk_with_other_bytes_fails_its_transfer_only(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    src, ids = caches(4, seed=14), [1, 0, 2]
    good = await start_good_transfer(tx, rx, src, ids)
    opening, chunks, end = transfer_frames("forged", caches(3, seed=15), [0, 1, 2], rx.epoch)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, [opening, *chunks[:-1], foreign_chunk("forged"), chunks[-1], end])
    assert err.value.code() is grpc.StatusCode.DATA_LOSS and "overlap" in err.value.details()
    assert rx.stats()["reserved_bytes"] == reservation(len(ids))  # the good transfer's only
    finish_good_transfer(good, rx, src, ids)
    assert rx.take("forged").state is TransferState.FAILED
    assert rx.stats()["reserved_bytes"] == 0 and rx.stats()["staged_bytes"] == 0


def end_frame(tid: str) -> bytes:
    return framing.encode(pb.KVFrame(end=pb.TransferEnd(transfer_id=tid, num_chunks=2, total_bytes=2 * BB)))


BAD_FRAMES = {
    "chunk_for_a_concurrent_transfer": (lambda: foreign_chunk("good"), "chunk for another transfer"),
    "chunk_for_an_unknown_transfer": (lambda: foreign_chunk("nobody-opened-this"), "chunk for another transfer"),
    "end_for_a_concurrent_transfer": (lambda: end_frame("good"), "end for another transfer"),
    "end_for_an_unknown_transfer": (lambda: end_frame("nobody-opened-this"), "end for another transfer"),
    "second_open": (lambda: transfer_frames("good", caches(3, seed=0), [0, 1, 2], "")[0], "unexpected `open`"),
    "chunk_cut_in_its_payload": (lambda: foreign_chunk("broken")[:-100], "malformed frame"),
}


@pytest.mark.parametrize("bad", BAD_FRAMES)
async def test_a_frame_the_stream_cannot_carry_is_invalid_argument_and_leaves_every_transfer_intact(
    make_receiver, make_sender, bad
):
    rx, tx = make_receiver(), make_sender()
    src, ids = caches(4, seed=16), [0, 3, 1]
    good = await start_good_transfer(tx, rx, src, ids)
    make_frame, words = BAD_FRAMES[bad]
    opening, chunks, _ = transfer_frames("broken", caches(1, seed=17), [0], rx.epoch, lease_ms=SHORT_LEASE_MS)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, [opening, chunks[0], make_frame(), chunks[1]])
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
    assert rx.table.state_of("broken") is not TransferState.DONE  # not completed by a foreign end
    assert rx.table.state_of("nobody-opened-this") is None
    finish_good_transfer(good, rx, src, ids)
    assert rx.stats()["chunks"] == 1 + FP.num_layers  # broken's first chunk and good's
    await assert_staging_freed_at_lease_expiry(rx, "broken")
