"""The same-node path: payloads in shared memory files handed over a Unix socket, control on gRPC.

Honest transfers arrive byte-identical and reuse released files; against peers no honest one would
be (no secret, a file that could shrink or is too small, a chunk with a payload, no file at all)
the receiver refuses the transfer, frees what it reserved, holds no descriptor, and stays up."""

from __future__ import annotations

import fcntl
import os
import socket

import grpc
import pytest

from pdserve.kvtransfer import framing
from pdserve.kvtransfer.incoming import TransferState
from pdserve.kvtransfer.same_node import MIN_SEGMENT_BYTES, SEALS, Segment, socket_name
from pdserve.proto import kvtransfer_pb2 as pb
from tests.kvtransfer import test_transport
from tests.kvtransfer.test_transport import BB, BS, FP, SECRET, WAIT_S, assert_arrived, caches, raw_push, send, wait_for

made, make_receiver, make_sender = test_transport.made, test_transport.make_receiver, test_transport.make_sender
LOCAL = dict(same_node=True)
BLOCKS = 2
TRANSFER_BYTES = BLOCKS * BB * FP.num_layers


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def warmed(make_receiver, make_sender, **rx_kw):
    """A receiver and a sender that has handshaken with it, so its next transfers go same-node."""
    rx, tx = make_receiver(**{**LOCAL, **rx_kw}), make_sender(**LOCAL)
    tx.handshake(rx.address)
    return rx, tx


def raw_link(rx, secret: str = SECRET) -> socket.socket:
    """A connection to the receiver's socket, authenticated with `secret`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(WAIT_S)
    s.connect(socket_name(rx.epoch))
    s.send(b"auth:" + secret.encode())
    return s


def memfd(nbytes: int, seals: int = SEALS, fill: int = 7) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.write(fd, bytes([fill]) * nbytes)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def same_node_frames(rx, tid: str, fill: int = 7, payload: bool = False) -> list[bytes]:
    """Open (same-node, 2 blocks), both layers' chunks of bytes `fill` (in the frames if `payload`),
    and the end marker."""
    opening = pb.TransferOpen(transfer_id=tid, fingerprint=FP.to_proto(), num_tokens=BLOCKS * BS,
                              num_blocks=BLOCKS, lease_ms=5000, epoch=rx.epoch, same_node=True)
    frames = [framing.encode(pb.KVFrame(open=opening))]
    for layer in range(FP.num_layers):
        parts = [memoryview(bytes([fill]) * (BLOCKS * BB))]
        hdr = pb.ChunkHeader(transfer_id=tid, layer=layer, block_start=0, num_blocks=BLOCKS,
                             crc32c=framing.checksum(parts))
        frames.append(framing.encode(pb.KVFrame(chunk=hdr), parts if payload else ()))
    end = pb.TransferEnd(transfer_id=tid, num_chunks=FP.num_layers, total_bytes=TRANSFER_BYTES)
    return [*frames, framing.encode(pb.KVFrame(end=end))]


def test_a_transfer_between_engines_on_one_node_arrives_byte_identical_through_shared_memory(
        make_receiver, make_sender):
    rx, tx = warmed(make_receiver, make_sender)
    src, ids = caches(20, seed=3), [3, 4, 5, 9, 0, 1, 2, 17, 18]
    res = send(tx, rx.address, "local", src, ids).result.result(WAIT_S)
    assert res.state is TransferState.DONE, res.error
    assert (rx.stats()["same_node"], rx.stats()["done"]) == (1, 1)
    assert_arrived(rx, "local", src, ids)


def test_a_released_file_carries_the_next_transfer_and_an_unreleased_one_does_not(make_receiver, make_sender):
    rx, tx = warmed(make_receiver, make_sender)
    src, ids = caches(8, seed=4), [0, 1, 2, 3]
    first = send(tx, rx.address, "first", src, ids)
    assert first.result.result(WAIT_S).state is TransferState.DONE
    second = send(tx, rx.address, "second", src, ids)  # "first" still staged: a file of its own
    assert second.result.result(WAIT_S).state is TransferState.DONE
    assert second._segment is not first._segment
    rx.take("first").release()  # loaded: the receiver unmaps it and hands it back
    link = tx._peers[rx.address].link
    wait_for(lambda: link._idle)
    third = send(tx, rx.address, "third", src, ids)
    assert third.result.result(WAIT_S).state is TransferState.DONE
    assert third._segment is first._segment
    assert_arrived(rx, "third", src, ids)


def test_a_sender_whose_files_are_never_released_keeps_no_more_of_them_than_its_pool(make_receiver, made):
    rx = make_receiver(**LOCAL)
    tx = test_transport.KVSender(test_transport.settings(same_node_pool_bytes=MIN_SEGMENT_BYTES, **LOCAL), FP)
    made.append(tx)
    tx.handshake(rx.address)
    src, ids = caches(4, seed=7), [0, 1, 2]
    for i in range(3):  # staged, never loaded: the receiver holds each file
        assert send(tx, rx.address, f"held{i}", src, ids).result.result(WAIT_S).state is TransferState.DONE
    link = tx._peers[rx.address].link
    assert sum(s.capacity for s in link._waiting.values()) <= MIN_SEGMENT_BYTES
    assert list(link._waiting) == ["held2"] and not link._lent
    assert_arrived(rx, "held0", src, ids)  # dropped by the sender, still whole on the receiver


def test_a_receiver_that_does_not_offer_shared_memory_gets_the_payloads_over_grpc(make_receiver, make_sender):
    rx, tx = make_receiver(same_node=False), make_sender(**LOCAL)
    tx.handshake(rx.address)
    src, ids = caches(4, seed=5), [0, 1, 2]
    assert send(tx, rx.address, "remote", src, ids).result.result(WAIT_S).state is TransferState.DONE
    assert rx.stats()["same_node"] == 0
    assert_arrived(rx, "remote", src, ids)


def test_a_handed_over_file_cannot_be_shrunk_under_the_receivers_mapping():
    seg = Segment(MIN_SEGMENT_BYTES)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 0)  # the SIGBUS a truncated mapping would deliver to the receiver
    finally:
        seg.close()


@pytest.mark.parametrize("secret", ["", "wrong-secret"], ids=["missing", "wrong"])
def test_a_link_without_the_secret_is_closed_and_takes_no_file(make_receiver, secret):
    rx = make_receiver(**LOCAL)
    link = raw_link(rx, secret)
    assert link.recv(16) == b""  # closed, no "ok"
    before = open_fds()
    early = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    early.connect(socket_name(rx.epoch))
    fd = memfd(TRANSFER_BYTES)
    socket.send_fds(early, [b"early"], [fd])  # a file before the secret
    early.settimeout(WAIT_S)
    assert early.recv(16) == b""
    os.close(fd)
    early.close()
    link.close()
    wait_for(lambda: open_fds() <= before)


@pytest.mark.parametrize(
    "seals, nbytes, detail",
    [(0, TRANSFER_BYTES, "not sealed against shrinking"),
     (SEALS, TRANSFER_BYTES - 1, f"has {TRANSFER_BYTES - 1} B")],
    ids=["unsealed", "too_small"],
)
async def test_a_file_that_could_shrink_or_is_too_small_is_refused_and_a_good_transfer_still_arrives(
        make_receiver, make_sender, seals, nbytes, detail):
    rx, tx = warmed(make_receiver, make_sender)
    link = raw_link(rx)
    assert link.recv(16) == b"ok"
    fd = memfd(nbytes, seals)
    socket.send_fds(link, [b"hostile"], [fd])
    os.close(fd)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, same_node_frames(rx, "hostile"))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and detail in err.value.details()
    assert rx.table.state_of("hostile") is TransferState.FAILED and rx.stats()["reserved_bytes"] == 0
    src, ids = caches(4, seed=6), [0, 1, 2]
    assert send(tx, rx.address, "good", src, ids).result.result(WAIT_S).state is TransferState.DONE
    assert_arrived(rx, "good", src, ids)


async def test_a_file_handed_over_by_a_peer_with_the_secret_carries_its_transfer(make_receiver):
    rx = make_receiver(**LOCAL)
    link = raw_link(rx)
    assert link.recv(16) == b"ok"
    fd = memfd(TRANSFER_BYTES, fill=9)
    socket.send_fds(link, [b"raw"], [fd])
    os.close(fd)
    ack = await raw_push(rx.address, same_node_frames(rx, "raw", fill=9))
    assert ack.state == pb.DONE, ack.error
    t = rx.take("raw")
    assert all(bytes(c.payload) == bytes([9]) * (BLOCKS * BB) for c in t.chunks.values())
    t.release()
    assert link.recv(64) == b"raw"  # handed back for reuse


async def test_a_same_node_chunk_carrying_its_payload_in_the_frame_is_refused(make_receiver):
    rx = make_receiver(**LOCAL)
    link = raw_link(rx)
    assert link.recv(16) == b"ok"
    fd = memfd(TRANSFER_BYTES)
    socket.send_fds(link, [b"both"], [fd])
    os.close(fd)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, same_node_frames(rx, "both", payload=True))
    assert err.value.code() is grpc.StatusCode.DATA_LOSS and "carries its payload" in err.value.details()
    assert rx.stats()["reserved_bytes"] == rx.stats()["staged_bytes"] == 0


async def test_a_same_node_open_without_a_file_fails_once_the_wait_is_over_and_frees_its_reservation(
        make_receiver):
    rx = make_receiver(connect_timeout_s=0.3, **LOCAL)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, same_node_frames(rx, "nofile"))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "no memory file" in err.value.details()
    assert rx.table.state_of("nofile") is TransferState.FAILED and rx.stats()["reserved_bytes"] == 0


def test_files_no_open_claims_are_closed_and_a_second_file_for_one_transfer_is_not_kept(make_receiver):
    rx = make_receiver(connect_timeout_s=0.3, **LOCAL)
    link = raw_link(rx)
    assert link.recv(16) == b"ok"
    before = open_fds()
    for _ in range(2):
        fd = memfd(TRANSFER_BYTES)
        socket.send_fds(link, [b"unclaimed"], [fd])
        os.close(fd)
    wait_for(lambda: open_fds() == before + 1)  # the first is held for an open, the second closed
    wait_for(lambda: open_fds() == before)  # and the first closed after the wait


async def test_a_same_node_open_to_a_receiver_that_offers_no_socket_is_refused_and_frees_its_reservation(
        make_receiver):
    rx = make_receiver(same_node=False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, same_node_frames(rx, "unoffered"))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "does not take" in err.value.details()
    assert rx.table.state_of("unoffered") is TransferState.FAILED and rx.stats()["reserved_bytes"] == 0
