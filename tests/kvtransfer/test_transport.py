"""KVSender -> KVReceiver over real gRPC on 127.0.0.1: streams, auth, refusals, leases, TLS."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer import framing
from pdserve.kvtransfer.auth import SECRET_METADATA_KEY
from pdserve.kvtransfer.block_layout import BlockLayout
from pdserve.kvtransfer.fingerprint import KVFingerprint
from pdserve.kvtransfer.incoming import CHUNK_OVERHEAD_BYTES, TransferState
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.rpc import SERVICE
from pdserve.kvtransfer.sender import KVSender
from pdserve.proto import kvtransfer_pb2 as pb
from tests.tls_certs import make_tls_files

SECRET = "unit-test-secret"
FP = KVFingerprint("tiny", "float32", block_size=4, kv_layout="cpu:test", num_layers=2, num_kv_heads=2, head_size=64)
HEADS, BS, HEAD = FP.num_kv_heads, FP.block_size, FP.head_size
BB = FP.block_bytes_per_layer  # 4 KiB
BASE = dict(secret=SECRET, num_streams=3, chunk_bytes=2 * BB, max_frame_bytes=64 << 10, tune_malloc=False,
            same_node=False)  # payloads in frames: these tests are about the gRPC path (same-node: test_same_node)
WAIT_S = 10


def reservation(num_blocks: int) -> int:
    """What a receiver reserves for a transfer of `num_blocks` blocks: each block of each layer
    with the most its chunk frame may hold beyond the payload."""
    return num_blocks * (BB + CHUNK_OVERHEAD_BYTES) * FP.num_layers


def settings(**kw) -> KVTransferSettings:
    return KVTransferSettings(**{**BASE, **kw})


@pytest.fixture
def made():
    objs: list[KVReceiver | KVSender] = []
    yield objs
    for obj in reversed(objs):
        obj.close() if isinstance(obj, KVSender) else obj.stop()


@pytest.fixture
def make_receiver(made):
    def make(fp: KVFingerprint = FP, **kw) -> KVReceiver:
        made.append(rx := KVReceiver(settings(**kw), fp))
        rx.start()
        return rx

    return make


@pytest.fixture
def make_sender(made):
    def make(fp: KVFingerprint = FP, **kw) -> KVSender:
        made.append(tx := KVSender(settings(**kw), fp))
        return tx

    return make


def caches(num_blocks: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, HEADS, BS, 2 * HEAD, generator=g) for _ in range(FP.num_layers)]


def send(tx: KVSender, addr: str, tid: str, src: list[torch.Tensor], ids: list[int], lease_ms=10_000, finish=True):
    t = tx.open(tid, addr, num_tokens=len(ids) * BS, lease_ms=lease_ms)
    per_chunk = max(1, tx.settings.chunk_bytes // BB)
    for layer, kv in enumerate(src):
        lay = BlockLayout(kv, kv.shape[0])
        for i in range(0, len(ids), per_chunk):
            part = ids[i : i + per_chunk]
            t.send_chunk(layer, i, len(part), lay.read(part))
    if finish:
        t.finish()
    return t


def wait_for(cond, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def assert_arrived(rx: KVReceiver, tid: str, src: list[torch.Tensor], src_ids: list[int]) -> None:
    t = rx.take(tid)
    assert t is not None and t.state is TransferState.DONE, t and t.error
    dst = [torch.zeros(len(src_ids) + 3, HEADS, BS, 2 * HEAD) for _ in src]
    dst_ids = [len(src_ids) + 2 - i for i in range(len(src_ids))]
    for c in t.chunks.values():
        lay = BlockLayout(dst[c.layer], dst[c.layer].shape[0])
        lay.write(dst_ids[c.block_start : c.block_start + c.num_blocks], c.payload)
    for layer in range(FP.num_layers):
        assert torch.equal(dst[layer][dst_ids], src[layer][src_ids])


def test_multi_stream_transfer_arrives_done_with_identical_bytes(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    opens = []
    real_open = rx.table.open
    rx.table.open = lambda msg, now: opens.append(msg.transfer_id) or real_open(msg, now)
    src, ids = caches(20, seed=1), [3, 4, 5, 9, 0, 1, 2, 17, 18, 11, 12, 13]
    res = send(tx, rx.address, "multi", src, ids).result.result(WAIT_S)
    assert res.state is TransferState.DONE, res.error
    assert (res.chunks, res.bytes) == (12, 2 * len(ids) * BB)
    assert opens == ["multi"] * 3
    stats = rx.stats()
    assert stats["opened"] == 1 and stats["done"] == 1 and stats["chunks"] == 12 and stats["bytes"] == res.bytes
    assert_arrived(rx, "multi", src, ids)
    assert rx.stats()["reserved_bytes"] == 0


def test_held_frames_reach_the_receiver_only_when_handed_over_and_arrive_whole(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender(chunk_bytes=8 * BB)
    src, ids = caches(8, seed=2), [5, 1, 2, 6]
    t = tx.open("held", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    t.send_chunk(0, 0, len(ids), BlockLayout(src[0], 8).read(ids), hold=True)
    time.sleep(0.3)
    assert rx.stats()["opened"] == 0  # held on the engine thread: not even opened there yet
    t.flush()
    wait_for(lambda: rx.stats()["chunks"] == 1)
    t.send_chunk(1, 0, len(ids), BlockLayout(src[1], 8).read(ids), hold=True)
    t.finish()  # hands over the held frame with the end marker
    res = t.result.result(WAIT_S)
    assert res.state is TransferState.DONE and res.chunks == 2, res.error
    assert_arrived(rx, "held", src, ids)


def test_held_frames_go_by_themselves_once_they_reach_a_chunks_bytes(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender(chunk_bytes=4 * BB)
    src, ids = caches(8, seed=3), [0, 1, 2, 3]
    t = tx.open("full", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    t.send_chunk(0, 0, 2, BlockLayout(src[0], 8).read(ids[:2]), hold=True)
    time.sleep(0.3)
    assert rx.stats()["chunks"] == 0
    t.send_chunk(0, 2, 2, BlockLayout(src[0], 8).read(ids[2:]), hold=True)  # 4 blocks held: a chunk's bytes
    wait_for(lambda: rx.stats()["chunks"] == 2)
    t.abort("the request went away")
    assert t.result.result(WAIT_S).state is TransferState.FAILED


def test_an_abort_drops_held_frames(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender(chunk_bytes=8 * BB)
    src, ids = caches(8, seed=4), [0, 1]
    t = tx.open("dropped", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    t.send_chunk(0, 0, 2, BlockLayout(src[0], 8).read(ids), hold=True)
    t.abort("the request went away")
    res = t.result.result(WAIT_S)
    assert res.state is TransferState.FAILED and "went away" in res.error
    assert rx.stats()["chunks"] == 0


def test_handshake_returns_the_epoch_and_a_restarted_receiver_has_a_new_one(make_receiver, make_sender):
    rx = make_receiver()
    assert make_sender().handshake(rx.address) == rx.epoch
    addr, old = rx.address, rx.epoch
    rx.stop()
    rx2 = make_receiver(listen_addr=addr)
    assert rx2.address == addr and rx2.epoch != old
    assert make_sender().handshake(addr) == rx2.epoch


async def raw_push(address: str, frames: list[bytes] | AsyncIterator[bytes], secret: str | None = SECRET) -> pb.PushAck:
    metadata = () if secret is None else ((SECRET_METADATA_KEY, secret),)
    async with grpc.aio.insecure_channel(address) as ch:
        push = ch.stream_unary(f"/{SERVICE}/Push", request_serializer=None, response_deserializer=pb.PushAck.FromString)
        return await push(iter(frames) if isinstance(frames, list) else frames, metadata=metadata, timeout=WAIT_S)


def open_frame(tid: str = "raw", fp: KVFingerprint = FP, epoch: str = "") -> bytes:
    msg = pb.TransferOpen(transfer_id=tid, fingerprint=fp.to_proto(), num_tokens=BS, num_blocks=1, lease_ms=5000,
                          epoch=epoch)
    return framing.encode(pb.KVFrame(open=msg))


def chunk_frame(tid: str = "raw") -> bytes:
    payload = [memoryview(bytes(BB))]
    hdr = pb.ChunkHeader(transfer_id=tid, layer=0, block_start=0, num_blocks=1, crc32c=framing.checksum(payload))
    return framing.encode(pb.KVFrame(chunk=hdr), payload)


@pytest.mark.parametrize("secret", ["", "wrong-secret"], ids=["missing", "wrong"])
async def test_bad_secret_is_unauthenticated_on_handshake_and_push_and_nothing_is_accepted(
    make_receiver, make_sender, secret
):
    rx, tx = make_receiver(), make_sender(secret=secret)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        tx.handshake(rx.address)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    res = send(tx, rx.address, "x", caches(2, 0), [0, 1]).result.result(WAIT_S)
    assert res.state is TransferState.FAILED and "UNAUTHENTICATED" in res.error
    async def held_back():  # a client that sends its frames only after a long pause
        await asyncio.sleep(WAIT_S)
        for frame in (open_frame(), chunk_frame()):
            yield frame

    # The receiver refuses before reading a frame: a client that has sent none gets the status.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(raw_push(rx.address, held_back(), secret=secret or None), WAIT_S / 2)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # A client whose frames are on their way may see the status replaced by gRPC's asyncio client
    # (INTERNAL "Internal error from Core" while a write is in flight, grpc/grpc#36066): the
    # receiver reads nothing from an unauthenticated peer, so it cannot wait for the writes to end.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, [open_frame(), chunk_frame()], secret=secret or None)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED or (
        err.value.code() is grpc.StatusCode.INTERNAL and "Internal error from Core" in err.value.details())
    assert rx.stats()["opened"] == 0 and rx.stats()["chunks"] == 0 and rx.stats()["reserved_bytes"] == 0


@pytest.mark.parametrize(
    "frames, detail",
    [([chunk_frame()], "first frame"), ([b"\x0b\x0c"], "malformed frame"), ([], "empty")],
    ids=["chunk_first", "garbage", "empty"],
)
async def test_push_not_starting_with_open_is_invalid_argument(make_receiver, frames, detail):
    rx = make_receiver()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_push(rx.address, frames)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and detail in err.value.details()
    assert rx.stats()["opened"] == 0 and rx.stats()["chunks"] == 0


async def test_raw_push_with_hand_made_frames_is_answered_with_its_state(make_receiver):
    rx = make_receiver(fp=dataclasses.replace(FP, num_layers=1))
    end = framing.encode(pb.KVFrame(end=pb.TransferEnd(transfer_id="raw", num_chunks=1, total_bytes=BB)))
    ack = await raw_push(rx.address, [open_frame(fp=rx.fingerprint, epoch=rx.epoch), chunk_frame(), end])
    assert ack.state == pb.DONE and (ack.chunks_received, ack.bytes_received) == (1, BB)


async def test_fingerprint_mismatch_is_refused_naming_each_field(make_receiver, make_sender):
    rx = make_receiver()
    theirs = dataclasses.replace(FP, model="other", block_size=8, num_layers=3)
    with pytest.raises(grpc.aio.AioRpcError) as on_handshake:
        make_sender(fp=theirs).handshake(rx.address)
    with pytest.raises(grpc.aio.AioRpcError) as on_push:
        await raw_push(rx.address, [open_frame(fp=theirs)])
    for err in (on_handshake, on_push):
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert all(f"{name}:" in err.value.details() for name in ("model", "block_size", "num_layers"))
        assert not any(f"{n}:" in err.value.details() for n in ("dtype", "kv_layout", "num_kv_heads", "head_size"))
    assert rx.stats()["opened"] == 0


def test_receiver_requiring_a_secret_refuses_to_start_without_one():
    with pytest.raises(ValueError, match="secret"):
        KVReceiver(settings(secret="", require_secret=True), FP)


def test_lease_expiry_while_the_sender_stalls_frees_staging_and_fails_the_send(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    t = tx.open("stall", rx.address, num_tokens=4 * BS, lease_ms=300)
    t.send_chunk(0, 0, 1, [memoryview(bytes(BB))])
    wait_for(lambda: rx.stats()["chunks"] == 1)
    assert rx.stats()["reserved_bytes"] == reservation(4)
    res = t.result.result(WAIT_S)
    assert res.state is TransferState.FAILED
    wait_for(lambda: rx.stats()["expired"] == 1)
    assert rx.stats()["reserved_bytes"] == 0 and rx.stats()["staged_bytes"] == 0
    assert rx.table.state_of("stall") is TransferState.FAILED


def test_one_transfers_lease_expiry_does_not_fail_a_concurrent_transfer(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    tx.handshake(rx.address)
    src, ids = caches(4, seed=2), [0, 1, 2, 3]
    slow = tx.open("slow", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    stalled = tx.open("stalled", rx.address, num_tokens=BS, lease_ms=300)
    stalled.send_chunk(0, 0, 1, [memoryview(bytes(BB))])
    assert stalled.result.result(WAIT_S).state is TransferState.FAILED
    for layer, kv in enumerate(src):
        slow.send_chunk(layer, 0, len(ids), BlockLayout(kv, 4).read(ids))
    slow.finish()
    try:
        res = slow.result.result(5)
    except concurrent.futures.TimeoutError:
        pytest.fail("the concurrent transfer's result never completed after the other one's lease expired")
    assert res.state is TransferState.DONE, res.error
    assert_arrived(rx, "slow", src, ids)


def test_receiver_stopped_mid_transfer_fails_every_send_without_hanging(make_receiver, make_sender):
    rx, tx = make_receiver(), make_sender()
    src = caches(8, seed=3)
    ts = [send(tx, rx.address, f"cut{i}", src, list(range(8)), lease_ms=60_000, finish=False) for i in range(2)]
    wait_for(lambda: rx.stats()["chunks"] == 16)
    rx.stop()
    for t in ts:
        res = t.result.result(WAIT_S)
        assert res.state is TransferState.FAILED and res.error


def test_oversized_frame_is_refused_and_a_concurrent_transfer_is_unaffected(make_receiver, make_sender):
    rx = make_receiver(max_frame_bytes=64 << 10)
    tx = make_sender(max_frame_bytes=1 << 20, num_streams=2)
    tx.handshake(rx.address)
    src, ids = caches(20, seed=4), list(range(20))
    good = tx.open("good", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    big = tx.open("big", rx.address, num_tokens=len(ids) * BS, lease_ms=10_000)
    lays = [BlockLayout(kv, 20) for kv in src]
    good.send_chunk(0, 0, 2, lays[0].read(ids[:2]))
    big.send_chunk(0, 0, 20, lays[0].read(ids))
    assert 20 * BB > rx.settings.max_frame_bytes
    big.finish()
    res_big = big.result.result(WAIT_S)
    assert res_big.state is TransferState.FAILED and "RESOURCE_EXHAUSTED" in res_big.error
    for layer, lay in enumerate(lays):
        for i in range(0 if layer else 2, 20, 2):
            good.send_chunk(layer, i, 2, lay.read(ids[i : i + 2]))
    good.finish()
    res = good.result.result(WAIT_S)
    assert res.state is TransferState.DONE, res.error
    assert_arrived(rx, "good", src, ids)


def test_transfer_succeeds_over_tls_and_a_plaintext_sender_is_refused(make_receiver, make_sender, tmp_path):
    tls = make_tls_files(tmp_path)
    rx = make_receiver(tls_cert_file=tls.server_cert, tls_key_file=tls.server_key)
    tx = make_sender(tls_ca_file=tls.ca)
    assert tx.handshake(rx.address) == rx.epoch
    src, ids = caches(6, seed=5), [5, 4, 3, 0, 1]
    res = send(tx, rx.address, "tls", src, ids).result.result(WAIT_S)
    assert res.state is TransferState.DONE, res.error
    assert_arrived(rx, "tls", src, ids)
    plain = make_sender(connect_timeout_s=2)
    res = send(plain, rx.address, "plain", src, ids).result.result(WAIT_S)
    assert res.state is TransferState.FAILED
    assert rx.stats()["opened"] == 1


def test_a_cancelled_transfer_is_refused_to_its_sender_at_once_not_at_the_lease(make_receiver, make_sender):
    rx = make_receiver()
    rx.cancel("gone", "the decode request ended before it was scheduled")
    res = send(make_sender(), rx.address, "gone", caches(4, 0), [0, 1], lease_ms=60_000).result.result(WAIT_S)
    assert res.state is TransferState.FAILED
    assert "FAILED_PRECONDITION" in res.error and "decode request ended" in res.error
    assert rx.stats()["reserved_bytes"] == 0


def test_a_second_receiver_on_a_taken_port_fails_instead_of_sharing_its_connections(make_receiver):
    addr = make_receiver().address
    with pytest.raises(RuntimeError, match=f"could not bind {addr}"):
        make_receiver(listen_addr=addr)


def mutual_tls(tmp_path) -> tuple[dict, dict]:
    """Receiver and sender settings for mutual TLS under one CA."""
    pki = make_tls_files(tmp_path / "ca")
    receiver = dict(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    sender = dict(tls_ca_file=pki.ca, tls_client_cert_file=pki.client_cert, tls_client_key_file=pki.client_key)
    return receiver, sender


def test_with_mutual_tls_a_sender_presenting_a_certificate_the_ca_signed_transfers(
    make_receiver, make_sender, tmp_path
):
    receiver_tls, sender_tls = mutual_tls(tmp_path)
    rx, tx = make_receiver(**receiver_tls), make_sender(**sender_tls)
    assert tx.handshake(rx.address) == rx.epoch
    src, ids = caches(6, seed=6), [2, 0, 5, 1]
    res = send(tx, rx.address, "mtls", src, ids).result.result(WAIT_S)
    assert res.state is TransferState.DONE, res.error
    assert_arrived(rx, "mtls", src, ids)


@pytest.mark.parametrize("client_cert", ["none", "another_ca"])
def test_with_mutual_tls_a_sender_without_a_certificate_the_ca_signed_is_refused_and_nothing_is_accepted(
    make_receiver, make_sender, tmp_path, client_cert
):
    receiver_tls, sender_tls = mutual_tls(tmp_path)
    if client_cert == "none":
        sender_tls = dict(tls_ca_file=sender_tls["tls_ca_file"])
    else:
        other = make_tls_files(tmp_path / "other", ca_name="another CA")
        sender_tls.update(tls_client_cert_file=other.client_cert, tls_client_key_file=other.client_key)
    rx, tx = make_receiver(**receiver_tls), make_sender(connect_timeout_s=2, **sender_tls)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        tx.handshake(rx.address)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    res = send(tx, rx.address, "refused", caches(2, 0), [0, 1]).result.result(WAIT_S)
    assert res.state is TransferState.FAILED
    assert rx.stats()["opened"] == 0 and rx.stats()["chunks"] == 0 and rx.stats()["reserved_bytes"] == 0
