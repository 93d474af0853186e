"""The KV receiver against senders no honest one would be: peers holding the secret that send
overlapping ranges, padded or doubled frames, or a stale epoch, and callers without it that send
huge handshakes. Whatever they send, what a transfer stages stays within its reservation, memory
read before the secret is checked stays small, and a good transfer pushed alongside arrives DONE."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import grpc
import psutil
import pytest

from pdserve.kvtransfer import framing, sender
from pdserve.kvtransfer.incoming import TransferState
from pdserve.kvtransfer.receiver import MAX_HANDSHAKE_BYTES
from pdserve.proto import kvtransfer_pb2 as pb
from tests.kvtransfer import test_receiver_bad_input as bad
from tests.kvtransfer import test_transport
from tests.kvtransfer.test_transport import BB, FP, SECRET, WAIT_S, caches, raw_push, reservation, send

made, make_receiver, make_sender = test_transport.made, test_transport.make_receiver, test_transport.make_sender
"""The transport tests' fixtures: receivers and senders on 127.0.0.1, stopped after the test."""


def padded(frame: bytes, pad_bytes: int) -> bytes:
    """`frame` with an unknown length-delimited field (number 14) of `pad_bytes` in front."""
    return bytes([(14 << 3) | 2]) + framing._varint(pad_bytes) + bytes(pad_bytes) + frame


def range_chunk(tid: str, layer: int, start: int, n: int, fill: int) -> bytes:
    """A well-formed chunk of blocks [start, start + n) of `layer`, all bytes `fill`."""
    payload = [memoryview(bytes([fill]) * (n * BB))]
    hdr = pb.ChunkHeader(transfer_id=tid, layer=layer, block_start=start, num_blocks=n, crc32c=framing.checksum(payload))
    return framing.encode(pb.KVFrame(chunk=hdr), payload)


def repeated_header(tid: str) -> bytes:
    """A well-formed chunk frame whose header field comes twice (protobuf keeps the last)."""
    chunk = bad.foreign_chunk(tid)
    header, _ = framing.decode(chunk)
    return header.SerializeToString() + chunk


def watch_staging(rx, stop: asyncio.Event) -> asyncio.Task:
    """Sample every transfer's staged and reserved bytes until `stop`; the task returns the
    largest staged - reserved seen (<= 0 when staging never exceeded a reservation)."""
    async def run() -> int:
        worst = -(1 << 62)
        while not stop.is_set():
            with rx.table._lock:
                for t in rx.table._transfers.values():
                    worst = max(worst, t.staged_bytes - t.reserved_bytes) if t.chunks else worst
            await asyncio.sleep(0.001)
        return worst

    return asyncio.ensure_future(run())


async def test_overlapping_ranges_from_a_peer_with_the_secret_never_stage_beyond_the_reservation(
    make_receiver, make_sender
):
    rx = make_receiver(max_frame_bytes=1 << 20, chunk_bytes=4 * BB)
    src, ids = caches(8, seed=20), [4, 1, 6, 3]
    good = await bad.start_good_transfer(make_sender(), rx, src, ids)
    opening, chunks, end = bad.transfer_frames("hostile", caches(4, seed=21), [0, 1, 2, 3], rx.epoch)
    # Every suffix of every layer, each under its own (layer, block_start): 10 blocks a layer where 4 are reserved.
    nested = [range_chunk("hostile", layer, start, 4 - start, fill=start) for layer in range(2) for start in range(4)]
    stop = asyncio.Event()
    watcher = watch_staging(rx, stop)
    results = await asyncio.gather(raw_push(rx.address, [opening, *chunks[:2], *nested]),
                                   raw_push(rx.address, [opening, *reversed(nested), end]), return_exceptions=True)
    stop.set()
    assert await watcher <= 0
    assert all(isinstance(r, grpc.aio.AioRpcError) or r.state == pb.FAILED for r in results)
    assert any(isinstance(r, grpc.aio.AioRpcError) and r.code() is grpc.StatusCode.DATA_LOSS
               and "overlap" in r.details() for r in results)
    assert rx.table.state_of("hostile") is TransferState.FAILED
    assert rx.stats()["reserved_bytes"] == reservation(len(ids))  # the good transfer's only
    bad.finish_good_transfer(good, rx, src, ids)


@pytest.mark.parametrize("make_frame, words", [
    (lambda tid: padded(bad.foreign_chunk(tid), 100), "unknown, repeated or default"),
    (lambda tid: padded(bad.foreign_chunk(tid), framing.MAX_HEADER_BYTES), "exceeds"),
    (lambda tid: bad.foreign_chunk(tid) + bytes([(15 << 3) | 2, 1, 0]), "one payload"),
    (repeated_header, "unknown, repeated or default"),
], ids=["padded_with_an_unknown_field", "header_beyond_the_bound", "two_payloads", "repeated_header"])
async def test_a_frame_that_is_more_than_its_header_and_payload_is_refused_and_stages_nothing(
    make_receiver, make_frame, words
):
    rx = make_receiver(max_frame_bytes=1 << 20)
    opening, _, _ = bad.transfer_frames("padded", caches(1, seed=22), [0], rx.epoch)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, [opening, make_frame("padded")])
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
    assert rx.stats()["chunks"] == 0 and rx.stats()["staged_bytes"] == 0


def test_a_transfer_opened_for_a_receiver_that_restarted_is_refused_and_the_next_one_handshakes_again(
    make_receiver, make_sender
):
    rx = make_receiver()
    tx = make_sender()
    assert tx.handshake(rx.address) == rx.epoch
    addr = rx.address
    rx.stop()
    rx2 = make_receiver(listen_addr=addr)
    src, ids = caches(3, seed=23), [2, 0]
    stale = send(tx, addr, "stale", src, ids).result.result(WAIT_S)
    assert stale.state is TransferState.FAILED and "ABORTED: stale epoch" in stale.error
    assert rx2.stats()["opened"] == 0
    fresh = send(tx, addr, "fresh", src, ids).result.result(WAIT_S)
    assert fresh.state is TransferState.DONE, fresh.error
    test_transport.assert_arrived(rx2, "fresh", src, ids)


async def test_a_handshake_beyond_its_bound_is_refused_even_with_the_secret(make_receiver):
    rx = make_receiver(max_frame_bytes=1 << 20)
    request = pb.HandshakeRequest(fingerprint=FP.to_proto(), sender_id="x" * MAX_HANDSHAKE_BYTES)
    async with grpc.aio.insecure_channel(rx.address) as ch:
        call = ch.unary_unary(f"/{test_transport.SERVICE}/Handshake",
                              request_serializer=pb.HandshakeRequest.SerializeToString,
                              response_deserializer=pb.HandshakeReply.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request, metadata=((test_transport.SECRET_METADATA_KEY, SECRET),), timeout=WAIT_S)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "at most" in err.value.details()


RECEIVER = textwrap.dedent("""
    import sys, time
    from pdserve.config.kvtransfer import KVTransferSettings
    from pdserve.kvtransfer.fingerprint import KVFingerprint
    from pdserve.kvtransfer.receiver import KVReceiver

    fp = KVFingerprint("tiny", "float32", block_size=4, kv_layout="cpu:test", num_layers=2, num_kv_heads=2,
                       head_size=64)
    settings = KVTransferSettings(secret=sys.argv[1], receive_window_bytes=int(sys.argv[2]), tune_malloc=False)
    rx = KVReceiver(settings, fp)  # 64 MiB frames, the default
    print(rx.start(), flush=True)
    sys.stdin.read()  # until the test closes it
    rx.stop()
""")
WINDOW_BYTES = 1 << 20
"""The receiver's flow-control window in this test: all it may read of a call before refusing it."""


async def test_huge_handshakes_without_the_secret_are_refused_before_they_are_read():
    """The receiver runs in a process of its own, so that its memory is all that is measured. Left
    to gRPC's probing, its window grew to 11 MiB a call on a busy machine (90 MiB for these eight)."""
    child = subprocess.Popen([sys.executable, "-c", RECEIVER, SECRET, str(WINDOW_BYTES)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        address = child.stdout.readline().strip()
        receiver = psutil.Process(child.pid)
        before = receiver.memory_info().rss

        async def one() -> grpc.StatusCode:
            async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as ch:
                call = ch.unary_unary(f"/{test_transport.SERVICE}/Handshake")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(bytes(48 << 20), timeout=30)
                return err.value.code()

        assert await asyncio.gather(*(one() for _ in range(8))) == [grpc.StatusCode.UNAUTHENTICATED] * 8
        grown_mib = (receiver.memory_info().rss - before) / 2**20
    finally:
        child.communicate(timeout=30)
    bound_mib = 8 * WINDOW_BYTES / 2**20 + 16  # a window per call, and the process's own noise
    assert grown_mib < bound_mib, f"the receiver grew by {grown_mib:.0f} MiB for 8 x 48 MiB it should not have read"


def test_the_senders_connections_are_bounded_and_the_least_recently_used_idle_peers_close_first(
    make_receiver, make_sender, monkeypatch
):
    monkeypatch.setattr(sender, "MAX_PEERS", 2)
    receivers = [make_receiver() for _ in range(4)]
    tx = make_sender()
    for rx in receivers:
        assert tx.handshake(rx.address) == rx.epoch
    assert list(tx._peers) == [receivers[2].address, receivers[3].address]
    src, ids = caches(2, seed=24), [1, 0]
    res = send(tx, receivers[0].address, "again", src, ids).result.result(WAIT_S)
    assert res.state is TransferState.DONE, res.error
    assert list(tx._peers) == [receivers[3].address, receivers[0].address]


async def test_a_refused_push_reaches_a_sender_still_writing_with_the_receivers_own_status(make_receiver):
    # gRPC's asyncio client reports INTERNAL instead when the status lands during one of its writes
    # (grpc/grpc#36066); the sender acts on the code, so the receiver lets it finish writing first.
    rx = make_receiver(max_frame_bytes=1 << 20)
    stale = bad.transfer_frames("stale", caches(1, seed=24), [0], epoch="an-epoch-before-a-restart")[0]
    unread = [bytes(4 << 10)] * 256  # after the refused open nothing is parsed
    for _ in range(20):
        results = await asyncio.gather(*(raw_push(rx.address, [stale, *unread]) for _ in range(4)),
                                       return_exceptions=True)
        assert [(r.code(), "stale epoch" in r.details()) for r in results] == [(grpc.StatusCode.ABORTED, True)] * 4
    assert rx.stats()["opened"] == 0 and rx.stats()["chunks"] == 0
