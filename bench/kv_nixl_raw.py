"""NIXL's own copy between two processes, for `pdserve bench kv`'s size table: the read that
vLLM's NixlConnector issues, without vLLM.

A spawned process registers a source buffer with a NIXL agent (UCX, as the connector
configures it) and hands over its agent metadata; this process registers a destination
buffer and reads N MiB in 1 MiB descriptors (one per block, as the connector reads blocks),
timed from posting the read to NIXL reporting it done. The same destination is read into
every time, as the same-node path reuses memory. The bytes are compared after the timing:
NIXL does no checksum of its own.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Callable

import torch

MIB = 1 << 20
_AGENT_CONFIG = {"backends": ["UCX"], "capture_telemetry": False}


def _source_main(max_mib: int, conn) -> None:  # runs in the spawned process
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent("pdserve-bench-source", nixl_agent_config(**_AGENT_CONFIG))
    src = torch.arange(max_mib * MIB, dtype=torch.uint8)  # wraps at 256: every byte position checked
    agent.register_memory(src)
    conn.send((agent.get_agent_metadata(), src.data_ptr()))
    conn.recv()  # stay until the reader is done


def _pattern(n_bytes: int) -> torch.Tensor:
    return torch.arange(n_bytes, dtype=torch.uint8)


def _read(agent, peer: str, dst: torch.Tensor, src_addr: int, mib: int) -> float:
    local = agent.get_xfer_descs([(dst.data_ptr() + i * MIB, MIB, 0) for i in range(mib)], "DRAM")
    remote = agent.get_xfer_descs([(src_addr + i * MIB, MIB, 0) for i in range(mib)], "DRAM")
    start = time.perf_counter()
    handle = agent.initialize_xfer("READ", local, remote, peer)
    state = agent.transfer(handle)
    while state == "PROC":
        state = agent.check_xfer_state(handle)
    elapsed = time.perf_counter() - start
    agent.release_xfer_handle(handle)
    if state != "DONE":
        raise RuntimeError(f"NIXL read of {mib} MiB ended in state {state}")
    return elapsed


def run(sizes_mib: list[int], repeats: int, progress: Callable[[int], None] | None = None) -> dict[int, float]:
    """MiB/s per size, the median of `repeats` reads after one untimed read."""
    from nixl._api import nixl_agent, nixl_agent_config

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_source_main, args=(max(sizes_mib), child), name="pdserve-bench-nixl-source")
    proc.start()
    child.close()
    try:
        if not conn.poll(120):
            raise RuntimeError("the NIXL source process did not start within 120 s")
        metadata, src_addr = conn.recv()
        agent = nixl_agent("pdserve-bench-reader", nixl_agent_config(**_AGENT_CONFIG))
        dst = torch.zeros(max(sizes_mib) * MIB, dtype=torch.uint8)
        agent.register_memory(dst)
        peer = agent.add_remote_agent(metadata)
        rates: dict[int, float] = {}
        for mib in sizes_mib:
            _read(agent, peer, dst, src_addr, mib)  # connects and faults the pages in, as a warm engine has
            if not torch.equal(dst[: mib * MIB], _pattern(mib * MIB)):
                raise RuntimeError(f"NIXL read {mib} MiB that differ from the source")
            times = [_read(agent, peer, dst, src_addr, mib) for _ in range(repeats)]
            rates[mib] = mib / statistics.median(times)
            if progress:
                progress(repeats)
        agent.deregister_memory(agent.get_reg_descs(dst))
        return rates
    finally:
        try:
            conn.send("done")
        except OSError:  # the source process is gone already
            pass
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        conn.close()
