"""`python -m pdserve.bench.gpu_check`: the KV path and the expert buffer on this machine's device.

Built for the lent GPU machine, which has PyTorch with CUDA and grpcio but no vLLM: it imports
pdserve's KV layer (block layout, sender, receiver, same-node path) and expert buffer, never the
vLLM connector. Without a GPU it runs the same code on CPU tensors, and `make test` runs it so
(`tests/bench/test_gpu_check.py`), so that it cannot rot between GPU sessions.

- KV: a paged cache in vLLM's GPU layout, (2, blocks, block_size, kv_heads, head_size) per layer,
  is pushed layer by layer as a simulated forward computes it (one matmul per layer), to a
  receiver in another process that loads it into its own cache on the device and compares every
  byte. Each layer's blocks leave through the LayerStager (side stream, pinned buffers), as the
  connector's do. Reported per path (gRPC, same-node): GB/s from open to DONE, and how long each
  layer's save held the forward up (what `save_kv_layer` costs the step; the goal is about 0).
- Experts: two buffered MoE layers with fewer slots than experts; the stall waiting for expert
  copies with prefetch on the copy stream against without it (CPU: no copy stream, no figure).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import secrets
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer.block_layout import BlockLayout
from pdserve.kvtransfer.fingerprint import KVFingerprint
from pdserve.kvtransfer.layer_stager import LayerStager


@dataclass(frozen=True)
class Shape:
    """A model's KV geometry and the prompt pushed."""

    layers: int = 32
    kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    prompt_tokens: int = 1024
    dtype: str = "bfloat16"

    @property
    def blocks(self) -> int:
        return -(-self.prompt_tokens // self.block_size)

    def fingerprint(self, device: str) -> KVFingerprint:
        return KVFingerprint("gpu-check", self.dtype, self.block_size, f"{device}:block_dim=1", self.layers,
                             self.kv_heads, self.head_size)


def _cache(shape: Shape, device: str, seed: int, num_blocks: int) -> list[torch.Tensor]:
    """Seeded per-layer caches, made on the CPU so both processes make the same bytes."""
    g = torch.Generator().manual_seed(seed)
    dims = (2, num_blocks, shape.block_size, shape.kv_heads, shape.head_size)
    return [torch.randn(dims, generator=g).to(getattr(torch, shape.dtype)).to(device) for _ in range(shape.layers)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _receiver_main(settings: KVTransferSettings, shape: Shape, device: str, seed: int, conn) -> None:
    from pdserve.kvtransfer.receiver import KVReceiver

    rx = KVReceiver(settings, shape.fingerprint(device), receiver_id="gpu-check-receiver")
    conn.send(rx.start())
    expected = _cache(shape, "cpu", seed, 2 * shape.blocks)
    src_ids = list(range(0, 2 * shape.blocks, 2))
    while (tid := conn.recv()) != "stop":
        deadline = time.monotonic() + 60
        while (t := rx.take(tid)) is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if t is None or t.state.name != "DONE":
            conn.send({"ok": False, "error": "not DONE" if t is None else t.error})
            continue
        dst = _cache(shape, device, seed + 1, shape.blocks + 3)
        layouts = [BlockLayout(kv, kv.shape[1]) for kv in dst]
        dst_ids = list(reversed(range(3, shape.blocks + 3)))
        start = time.perf_counter()
        for c in t.chunks.values():
            layouts[c.layer].write(dst_ids[c.block_start : c.block_start + c.num_blocks], c.payload)
        _sync(device)
        load_ms = (time.perf_counter() - start) * 1e3
        t.release()
        ok = all(torch.equal(dst[i][:, dst_ids].cpu(), expected[i][:, src_ids]) for i in range(shape.layers))
        conn.send({"ok": ok, "load_ms": load_ms, "same_node": t.same_node})
    rx.stop()


def _forward_layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w)


def _push(sender, stager, dest: str, shape: Shape, layouts: list[BlockLayout], x, w, device: str, tid: str) -> dict:
    """One prefill step that computes each layer, then saves its blocks, as the connector's
    worker does for a device cache (`save_kv_layer` through the LayerStager)."""
    ids = list(range(0, 2 * shape.blocks, 2))
    per_chunk = max(1, sender.settings.chunk_bytes // layouts[0].block_bytes)
    held = []
    start = time.perf_counter()
    stager.fence()
    t = sender.open(tid, dest, num_tokens=shape.prompt_tokens, lease_ms=60_000)
    for layer, lay in enumerate(layouts):
        x = _forward_layer(x, w)
        save = time.perf_counter()
        for b in range(0, len(ids), per_chunk):
            stager.send([t], layer, b, lay, ids[b : b + per_chunk])
        held.append(time.perf_counter() - save)
    _sync(device)
    forward_s = time.perf_counter() - start
    stager.finish(t, 0, 0)
    res = t.result.result(timeout=120)
    total_s = time.perf_counter() - start
    return {"state": res.state.name, "error": res.error, "bytes": res.bytes, "forward_s": forward_s,
            "total_s": total_s, "held_ms_per_layer": statistics.median(held) * 1e3}


def check_kv(shape: Shape, device: str, repeats: int) -> dict:
    from pdserve.kvtransfer.sender import KVSender

    seed = 1234
    settings = KVTransferSettings(secret=secrets.token_hex(16), tune_malloc=False)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(settings, shape, device, seed, child), daemon=True)
    proc.start()
    dest = parent.recv()
    layouts = [BlockLayout(kv, kv.shape[1]) for kv in _cache(shape, device, seed, 2 * shape.blocks)]
    hidden = 1024 if device == "cuda" else 256
    x = torch.randn(hidden, hidden, device=device)
    w = torch.randn(hidden, hidden, device=device) / hidden**0.5
    out: dict = {}
    try:
        start = time.perf_counter()
        y = x
        for _ in range(shape.layers):
            y = _forward_layer(y, w)
        _sync(device)
        out["forward_alone_ms"] = (time.perf_counter() - start) * 1e3
        for path, local in (("grpc", False), ("same_node", True)):
            sender = KVSender(settings.model_copy(update={"same_node": local}), shape.fingerprint(device))
            stager = LayerStager(torch.device(device))
            runs = []
            try:
                for i in range(repeats + 1):  # the first handshakes (and sets the same-node link up)
                    tid = f"{path}-{i}"
                    run = _push(sender, stager, dest, shape, layouts, x, w, device, tid)
                    parent.send(tid)
                    run.update(parent.recv())
                    if i:
                        runs.append(run)
            finally:
                stager.close()
                sender.close()
            out[path] = {
                "all_bytes_ok": all(r["ok"] and r["state"] == "DONE" for r in runs),
                "errors": sorted({r.get("error", "") for r in runs} - {""}),
                "same_node_used": all(r.get("same_node", False) for r in runs),
                "mib": runs[0]["bytes"] / 2**20,
                "gb_s": statistics.median(r["bytes"] / r["total_s"] for r in runs) / 1e9,
                "held_ms_per_layer": statistics.median(r["held_ms_per_layer"] for r in runs),
                "load_ms": statistics.median(r.get("load_ms", 0.0) for r in runs),
            }
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return out


def check_experts(device: str, steps: int) -> dict:
    """Stall waiting for expert copies over `steps` steps of two layers, prefetch on and off."""
    from pdserve.config.experts import ExpertBufferConfig
    from pdserve.experts.buffer import ExpertBuffer

    experts, hidden, inter, top_k = 16, 512, 1024, 2
    host13 = torch.randn(experts, 2 * inter, hidden)
    host2 = torch.randn(experts, hidden, inter)
    if device == "cuda":
        host13, host2 = host13.pin_memory(), host2.pin_memory()
    g = torch.Generator().manual_seed(7)
    routes = [torch.randint(0, experts, (8, top_k), generator=g) for _ in range(2 * steps)]
    stall = {}
    for prefetch in (False, True):
        cfg = ExpertBufferConfig(slots=4, policy="lru", prefetch=prefetch)
        layers = [ExpertBuffer(i, host13, host2, cfg, torch.device(device), top_k) for i in range(2)]
        layers[0].next = layers[1]
        x = torch.randn(64, hidden, device=device)
        for s in range(steps):
            for i, buf in enumerate(layers):
                ids = routes[2 * s + i].to(device)
                for _, group in buf.plan(ids):
                    buf.admit(group, ids)
                x = torch.tanh(x @ buf.w2[0] @ buf.w13[0][:inter])  # the layer's compute, on slot 0
                buf.prefetch_next()
        _sync(device)
        stall[prefetch] = sum(b.counters.stall_s for b in layers)
    return {"stall_ms_without_prefetch": stall[False] * 1e3, "stall_ms_with_prefetch": stall[True] * 1e3,
            "overlap": 1 - stall[True] / stall[False] if device == "cuda" and stall[False] else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--prompt-tokens", type=int, default=Shape.prompt_tokens)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--expert-steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = Shape(layers=args.layers, prompt_tokens=args.prompt_tokens)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": asdict(shape),
        "kv": check_kv(shape, device, args.repeats),
        "experts": check_experts(device, args.expert_steps),
    }
    print(json.dumps(report))
    return 0 if all(report["kv"][p]["all_bytes_ok"] for p in ("grpc", "same_node")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
