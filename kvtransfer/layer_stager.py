"""Moves KV blocks between a GPU cache and host memory without holding up the forward pass.

Sending: reading a layer's blocks for the wire means a device-to-host copy. A synchronous `.to("cpu")`
inside `save_kv_layer` makes the forward wait for every layer's copy, and a copy on the
forward's own stream would queue behind its kernels and delay the ones after it. Here the
forward thread only queues work: the copies go on a side stream, which first waits (on the
GPU) for what the forward's stream has queued so far, so they read the finished layer, into
page-locked host buffers; an ordered thread waits on each chunk's event, hands the bytes to the
sender and frees the buffer, and ends a transfer after its last chunk. `fence()` at the next
step's start makes that step's kernels wait (on the GPU, not the host) for copies still reading
blocks it might write.

Loading: a received payload sits in gRPC's buffers or a same-node file, pageable memory, from
which CUDA copies synchronously through its own staging. `load` copies it into page-locked
memory and queues the host-to-device copies on the side stream; the engine polls `done()` and
reports the load finished (so vLLM schedules the request) only once they have landed.

On a CPU cache the engine reads blocks in place (`BlockLayout.read`, no copy) and does not use
this; the stager still runs there (plain host buffers, copies that finish at once) so that
`make test` and `bench/gpu_check.py` exercise the same code the GPU runs.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.kvtransfer.block_layout import BlockLayout, LoadPiece, host_views
from pdserve.kvtransfer.sender import OutgoingTransfer

log = logging.getLogger(__name__)


@dataclass
class PendingLoad:
    """Host-to-device copies in flight; their host buffers live until `done()`."""

    written_bytes: int
    """Bytes written into the cache's blocks."""
    host_bytes: int
    """Bytes copied into page-locked memory first."""
    _hosts: list[torch.Tensor]
    _event: torch.cuda.Event | None

    def done(self) -> bool:
        if self._event is not None and not self._event.query():
            return False
        self._hosts.clear()
        return True


class LayerStager:
    """One per engine worker holding a device cache. `send` and `finish` are called from the
    forward thread; the stager's thread calls the transfer's `send_chunk` and `finish`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.on_cuda else None
        self._last: torch.cuda.Event | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.counters = {"d2h_bytes": 0, "frame_bytes": 0, "chunks": 0}
        """Bytes copied off the device into host buffers, and from those into frames or a
        same-node file (what `send_chunk` copied): written by the stager's thread only."""
        self._thread = threading.Thread(target=self._run, name="kv-layer-stager", daemon=True)
        self._thread.start()

    def send(self, transfers: Sequence[OutgoingTransfer], layer: int, block_start: int, layout: BlockLayout,
             block_ids: Sequence[int]) -> None:
        """Queue the copy of `block_ids` of `layer` and its send to each of `transfers` (the
        receiving ranks of a tensor-parallel peer); returns without waiting."""
        hosts: list[torch.Tensor] = []
        done = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            for src in layout.slices(block_ids):
                host = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.on_cuda)
                host.copy_(src, non_blocking=self.on_cuda)
                hosts.append(host)
            if self._stream is not None:
                done = torch.cuda.Event()
                done.record(self._stream)
                self._last = done
        self._jobs.put((list(transfers), layer, block_start, len(block_ids), hosts, done))

    def finish(self, transfer: OutgoingTransfer, compute_start_ns: int, compute_end_ns: int) -> None:
        """End `transfer` once its queued chunks are sent. It counts as finished from now on, so
        the engine does not take a queued end for a prompt computed only in part."""
        transfer.finished_marked = True
        self._jobs.put((transfer, compute_start_ns, compute_end_ns))

    def load(self, pieces: Sequence[LoadPiece]) -> PendingLoad:
        """Queue each piece (a payload made by a peer's read) into the cache; returns once the
        payloads are in page-locked memory, before they reach the device."""
        hosts: list[torch.Tensor] = []
        written = host_bytes = 0
        event = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            for piece in pieces:
                if all(b is None for b in piece.block_ids):  # every block of it is cached here already
                    continue
                host = torch.empty(piece.payload.nbytes, dtype=torch.uint8, pin_memory=self.on_cuda)
                with warnings.catch_warnings():  # a read-only source, only read
                    warnings.simplefilter("ignore", UserWarning)
                    host.copy_(torch.frombuffer(piece.payload, dtype=torch.uint8))
                host_bytes += piece.payload.nbytes
                written += piece._replace(payload=host_views([host])[0]).write()
                hosts.append(host)
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record(self._stream)
        return PendingLoad(written, host_bytes, hosts, event)

    def fence(self) -> None:
        """Called at a step's start: its kernels wait for the copies still reading the cache."""
        if self._last is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last)
            self._last = None

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._do(job)
            except Exception as exc:  # a failure ends those transfers only, never the thread
                for transfer in job[0] if isinstance(job[0], list) else [job[0]]:
                    log.exception("KV layer stager: %s failed", transfer.transfer_id)
                    transfer.abort(f"staging off the device failed: {exc}")

    def _do(self, job: tuple) -> None:
        if len(job) == 3:
            transfer, start_ns, end_ns = job
            transfer.finish(start_ns, end_ns)
            return
        transfers, layer, block_start, num_blocks, hosts, done = job
        if done is not None:
            done.synchronize()  # this thread waits for the copy; the forward never does
        self.counters["d2h_bytes"] += sum(h.numel() * h.element_size() for h in hosts)
        views = host_views(hosts)
        for transfer in transfers:
            self.counters["frame_bytes"] += transfer.send_chunk(layer, block_start, num_blocks, views)
        self.counters["chunks"] += 1
