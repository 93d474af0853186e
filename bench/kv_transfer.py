"""`pdserve bench kv`: KV transfer throughput, gRPC and same-node, against a plain TCP socket.

All transports move the same bytes between the same two processes over
loopback: this process sends, a spawned process receives (the real
`KVReceiver`, and a TCP server that reads into a preallocated buffer). Each
size is timed from the first byte offered to the receiver's acknowledgement
(for pdserve: the transfer DONE, its bytes staged for the engine to load).
The same-node path is the same sender and receiver with payloads in shared
memory (`kvtransfer/same_node.py`), once reusing the memory receivers hand
back and once with none reused (every transfer's pages fresh). A bare grpcio
stream of the same bytes in chunk-sized messages that the receiver drops is
grpcio's own ceiling: it separates what pdserve's protocol costs (framing,
checksums, staging) from what the library costs.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer.fingerprint import KVFingerprint
from pdserve.kvtransfer.receiver import server_options

# A synthetic engine whose KV block is exactly 1 MiB per layer (8 heads x 128
# tokens x 2 x 128 dims x fp32), one layer, so a payload of N MiB is N blocks.
BENCH_FINGERPRINT = KVFingerprint("bench", "float32", 128, "bench", 1, 8, 128)
MIB = 1 << 20
_RAW_SINK = "/pdserve.bench.RawSink/Push"


@dataclass
class SizeResult:
    size_mib: int
    grpc_mib_s: float
    tcp_mib_s: float
    ratio: float
    grpc_ms: float
    tcp_ms: float
    grpcio_raw_mib_s: float  # bare grpcio, same bytes and message size: the library's ceiling
    same_node_mib_s: float  # pdserve with payloads in shared memory, control on gRPC
    same_node_ms: float
    same_node_fresh_mib_s: float  # the same with no memory reused: every transfer's pages fresh


def _tcp_server(sock: socket.socket, stop: threading.Event, max_bytes: int) -> None:
    buf = bytearray(max_bytes)  # allocated and touched once: TCP's best case
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    break
                (n,) = struct.unpack("!Q", head)
                view, got = memoryview(buf), 0
                while got < n:
                    r = conn.recv_into(view[got:n], n - got)
                    if r == 0:
                        return
                    got += r
                conn.sendall(b"k")


def _raw_grpc_server(settings: KVTransferSettings) -> tuple[grpc.Server, int]:
    """A sink on the receiver's own transport settings (window, message limit)."""
    def sink(messages, ctx):
        return struct.pack("!Q", sum(len(m) for m in messages))

    server = grpc.server(ThreadPoolExecutor(2), options=server_options(settings))
    handler = grpc.method_handlers_generic_handler("pdserve.bench.RawSink", {"Push": grpc.stream_unary_rpc_method_handler(sink)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _receiver_main(settings: KVTransferSettings, max_bytes: int, conn) -> None:
    from pdserve.kvtransfer.receiver import KVReceiver

    rx = KVReceiver(settings, BENCH_FINGERPRINT, receiver_id="bench-receiver")
    addr = rx.start()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    stop = threading.Event()
    threading.Thread(target=_tcp_server, args=(tcp, stop, max_bytes), daemon=True).start()
    raw, raw_port = _raw_grpc_server(settings)
    conn.send((addr, tcp.getsockname()[1], raw_port))
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        rx.discard(msg)  # the bench's stand-in for the engine taking the transfer
        conn.send("ok")
    stop.set()
    tcp.close()
    raw.stop(0)
    rx.stop()


def _time_grpc(sender, rx_conn, addr: str, payload: torch.Tensor, size_mib: int) -> float:
    tid = uuid.uuid4().hex
    blocks = payload[: size_mib * MIB].view(size_mib, MIB)
    per_chunk = max(1, sender.settings.chunk_bytes // MIB)
    start = time.perf_counter()
    t = sender.open(tid, addr, num_tokens=size_mib * BENCH_FINGERPRINT.block_size, lease_ms=120_000)
    for b in range(0, size_mib, per_chunk):
        part = blocks[b : b + per_chunk]
        t.send_chunk(0, b, part.shape[0], [memoryview(part.numpy()).cast("B")])
    t.finish()
    res = t.result.result(timeout=120)
    elapsed = time.perf_counter() - start
    if res.state.name != "DONE":
        raise RuntimeError(f"bench transfer failed: {res.error}")
    rx_conn.send(tid)
    rx_conn.recv()
    return elapsed


def _time_tcp(sock: socket.socket, payload: torch.Tensor, size_mib: int) -> float:
    view = memoryview(payload[: size_mib * MIB].numpy()).cast("B")
    start = time.perf_counter()
    sock.sendall(struct.pack("!Q", view.nbytes))
    sock.sendall(view)
    if sock.recv(1) != b"k":
        raise RuntimeError("TCP baseline receiver went away")
    return time.perf_counter() - start


def _time_raw_grpc(push, messages: list[bytes]) -> float:
    start = time.perf_counter()
    push(iter(messages))
    return time.perf_counter() - start


def run(sizes_mib: list[int], repeats: int, settings: KVTransferSettings, progress=None) -> list[SizeResult]:
    """Median of `repeats` runs per size for each transport, alternating them."""
    from pdserve.kvtransfer.sender import KVSender

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(settings, max(sizes_mib) * MIB, child), daemon=True)
    proc.start()
    addr, tcp_port, raw_port = parent.recv()
    raw_channel = grpc.insecure_channel(
        f"127.0.0.1:{raw_port}", options=[("grpc.max_send_message_length", settings.max_frame_bytes)]
    )
    raw_push = raw_channel.stream_unary(_RAW_SINK, request_serializer=None, response_deserializer=None)
    sender = KVSender(settings.model_copy(update={"same_node": False}), BENCH_FINGERPRINT, sender_id="bench-sender")
    local = KVSender(settings.model_copy(update={"same_node": True}), BENCH_FINGERPRINT, sender_id="bench-same-node")
    fresh = KVSender(settings.model_copy(update={"same_node": True, "same_node_pool_bytes": 0}), BENCH_FINGERPRINT,
                     sender_id="bench-same-node-fresh")
    sock = socket.create_connection(("127.0.0.1", tcp_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = torch.randint(0, 255, (max(sizes_mib) * MIB,), dtype=torch.uint8)
    results = []
    try:
        _time_grpc(sender, parent, addr, payload, 1)  # warm up channels and handshake
        _time_grpc(local, parent, addr, payload, 1)  # and the same-node links they set up
        _time_grpc(fresh, parent, addr, payload, 1)
        _time_tcp(sock, payload, 1)
        chunk = settings.chunk_bytes
        for size in sizes_mib:
            flat = memoryview(payload[: size * MIB].numpy()).cast("B")
            messages = [bytes(flat[i : i + chunk]) for i in range(0, size * MIB, chunk)]
            _time_raw_grpc(raw_push, messages)
            _time_grpc(local, parent, addr, payload, size)  # shared memory of this size, reused from here on
            g, t, r, s, f = [], [], [], [], []
            for _ in range(repeats):
                g.append(_time_grpc(sender, parent, addr, payload, size))
                t.append(_time_tcp(sock, payload, size))
                r.append(_time_raw_grpc(raw_push, messages))
                s.append(_time_grpc(local, parent, addr, payload, size))
                f.append(_time_grpc(fresh, parent, addr, payload, size))
                if progress:
                    progress(1)
            gm, tm, rm, sm, fm = (statistics.median(x) for x in (g, t, r, s, f))
            results.append(SizeResult(size, size / gm, size / tm, tm / gm, gm * 1e3, tm * 1e3, size / rm,
                                      size / sm, sm * 1e3, size / fm))
    finally:
        sock.close()
        raw_channel.close()
        sender.close()
        local.close()
        fresh.close()
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return results
