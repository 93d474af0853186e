"""Worker side of GrpcKVConnector: moves KV bytes between the paged cache and the wire.

Producer: `save_kv_layer` pushes each layer's blocks as soon as the layer is
computed, so the transfer overlaps the rest of the forward pass. A CPU cache is read in
place; a GPU cache's blocks leave through a `LayerStager`, so the forward never waits on a copy.
Consumer: received transfers are staged by the receiver; between steps,
`get_transfer_results` copies finished ones into the blocks vLLM allocated (into a GPU cache
through the `LayerStager`, reported finished once the copies have landed).
Tensor parallelism: one WorkerSide per rank, each moving its own share of the KV heads
(`tp_shards`): a prefill rank pushes a part to each decode rank its heads overlap, and a decode
rank's load is done when every part it needs has landed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer.block_layout import BlockLayout
from pdserve.kvtransfer.connector_meta import GrpcConnectorMetadata, LoadJob, SendJob, TransferReport
from pdserve.kvtransfer.fingerprint import KVFingerprint, layout_name
from pdserve.kvtransfer.incoming import IncomingTransfer, TransferState
from pdserve.kvtransfer.layer_stager import LayerStager, PendingLoad
from pdserve.kvtransfer.load_plan import load_pieces, load_report, parts_error
from pdserve.kvtransfer.receiver import KVReceiver
from pdserve.kvtransfer.sender import KVSender, OutgoingTransfer
from pdserve.kvtransfer.tp_shards import check_shardable, destinations, part_id, rank_addr, sources

log = logging.getLogger(__name__)


class WorkerSide:
    """Next to the paged KV cache: owns the sender and/or receiver and the per-step copies."""

    def __init__(
        self,
        settings: KVTransferSettings,
        *,
        model_id: str,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        num_blocks: int,
        produce: bool,
        consume: bool,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.settings = settings
        self.model_id = model_id
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.num_blocks = num_blocks
        self.produce, self.consume = produce, consume
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.total_kv_heads = num_kv_heads * tp_size
        self.layers: list[BlockLayout] = []
        self.layer_index: dict[str, int] = {}
        self.fingerprint: KVFingerprint | None = None
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        self.stager: LayerStager | None = None
        self._meta = GrpcConnectorMetadata()
        self._outgoing: dict[str, list[OutgoingTransfer]] = {}  # one part per receiving rank
        self._compute_start_ns: dict[str, int] = {}
        self._finished_by_scheduler: set[str] = set()
        self._loads: dict[str, LoadJob] = {}
        self._parts: dict[str, dict[int, IncomingTransfer]] = {}  # per load, the parts taken so far, by sending rank
        self._landing: dict[str, tuple[list[IncomingTransfer], PendingLoad, float]] = {}  # device loads in flight
        self._invalid_blocks: set[int] = set()
        self._reports: dict[str, TransferReport] = {}
        # Payload bytes against bytes pdserve copied on each side: one copy per byte is the design
        # on a CPU cache (two sending from a GPU cache: off the device, then into the frame).
        self._counters = {"sent_bytes": 0, "send_copies_bytes": 0, "received_bytes": 0, "load_copies_bytes": 0,
                         "loads_done": 0, "loads_failed": 0, "sends_done": 0, "sends_failed": 0}

    @property
    def counters(self) -> dict[str, int]:
        """Bytes sent, received and copied; a stager's copies are the sending copies of a device cache."""
        out = dict(self._counters)
        if self.stager is not None:
            out["send_copies_bytes"] += self.stager.counters["d2h_bytes"] + self.stager.counters["frame_bytes"]
        return out

    # --- setup --------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = list(kv_caches)
        self.layer_index = {name: i for i, name in enumerate(names)}
        self.layers = [BlockLayout(kv_caches[n], self.num_blocks) for n in names]
        first = kv_caches[names[0]]
        lay = self.layers[0]
        self.fingerprint = KVFingerprint(
            model=self.model_id,
            dtype=str(first.dtype).removeprefix("torch."),
            block_size=self.block_size,
            kv_layout=layout_name(first.device.type, lay.block_dim, tuple(lay.block_shape), lay.heads_dim),
            num_layers=len(names),
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            tp_size=self.tp_size,
        )
        if lay.num_heads != self.num_kv_heads:
            raise ValueError(f"KV cache holds {lay.num_heads} heads per block, the model {self.num_kv_heads} per rank: "
                             f"unsupported KV layout {tuple(first.shape)}")
        if self.fingerprint.block_bytes_per_layer != lay.block_bytes:
            raise ValueError(
                f"KV block is {lay.block_bytes} B but the fingerprint implies "
                f"{self.fingerprint.block_bytes_per_layer} B: unsupported KV layout {tuple(first.shape)}"
            )
        if self.consume:
            self.receiver = KVReceiver(self._rank_settings(), self.fingerprint)
            self.receiver.start()
        if self.produce:
            self.sender = KVSender(self.settings, self.fingerprint)
        if not lay.on_cpu:
            self.stager = LayerStager(first.device)
        log.info("GrpcKVConnector worker ready: %s", self.fingerprint)

    def _rank_settings(self) -> KVTransferSettings:
        """This rank's receiver listens at the engine's address plus its rank (`tp_shards.rank_addr`)."""
        if self.tp_size == 1:
            return self.settings
        if self.settings.listen_addr.endswith(":0"):
            raise ValueError(f"with tensor parallelism ({self.tp_size} ranks) the KV receiver's listen_addr must name "
                             f"a port (rank r listens at port + r), not {self.settings.listen_addr!r}")
        return self.settings.model_copy(update={"listen_addr": rank_addr(self.settings.listen_addr, self.tp_rank)})

    def shutdown(self) -> None:
        for parts in self._outgoing.values():
            for t in parts:
                t.abort("engine shutting down")
        if self.stager is not None:
            self.stager.close()
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.stop()

    def discard(self, transfer_id: str, src_tp: int = 1) -> bool:
        """Free a transfer no request will load (see GrpcKVConnector.discard_transfer)."""
        if self.receiver is None:
            return False
        for pid in self._part_ids(transfer_id, src_tp).values():
            self.receiver.discard(pid)
        return True

    # --- per step -------------------------------------------------------------
    def bind(self, meta: GrpcConnectorMetadata) -> None:
        self._meta = meta
        if self.stager is not None:
            self.stager.fence()
        now_ns = time.time_ns()
        for job in meta.sends:
            if job.req_id not in self._outgoing:
                self._outgoing[job.req_id] = self._open_parts(job)
                self._compute_start_ns[job.req_id] = now_ns
        for transfer_id, reason in meta.cancels.items():
            assert self.receiver is not None, "cancel on an engine without the consumer role"
            self.receiver.cancel(transfer_id, reason)
        for job in meta.loads:
            assert self.receiver is not None, "load job on an engine without the consumer role"
            for pid in self._part_ids(job.transfer_id, job.src_tp).values():
                self.receiver.expect(pid, job.lease_ms)
            self._loads[job.req_id] = job

    def _open_parts(self, job: SendJob) -> list[OutgoingTransfer]:
        """This rank's part of the transfer, opened to each decode rank its heads overlap. A request's
        first job starts where the transfer does (`SchedulerSide._send_jobs`)."""
        assert self.sender is not None, "send job on an engine without the producer role"
        pid = part_id(job.transfer_id, self.tp_rank, self.tp_size)
        try:
            check_shardable(self.total_kv_heads, job.dest_tp)
        except ValueError as exc:  # no rank of that engine could take these heads
            t = self.sender.open(pid, job.dest, job.num_tokens, job.lease_ms, job.trace_parent, job.first_block)
            t.abort(f"decode TP size {job.dest_tp}: {exc}")
            return [t]
        return [self.sender.open(pid, rank_addr(job.dest, d), job.num_tokens, job.lease_ms, job.trace_parent,
                                 job.first_block)
                for d in destinations(self.tp_rank, self.tp_size, job.dest_tp, self.total_kv_heads)]

    def _part_ids(self, transfer_id: str, src_tp: int) -> dict[int, str]:
        """The parts this rank takes of a transfer from a prefill engine of `src_tp` ranks, by
        sending rank (none where that TP size does not split the heads: a load fails)."""
        if self.total_kv_heads % src_tp:
            return {}
        return {s: part_id(transfer_id, s, src_tp) for s in sources(self.tp_rank, self.tp_size, src_tp,
                                                                     self.total_kv_heads)}

    def _chunks(self, job: SendJob) -> Iterator[tuple[int, list[int]]]:
        per_chunk = max(1, self.settings.chunk_bytes // self.layers[0].block_bytes)
        for i in range(0, len(job.block_ids), per_chunk):
            yield job.first_block + i, job.block_ids[i : i + per_chunk]

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        if not self._meta.sends:
            return
        idx = self.layer_index[layer_name]
        layout = self.layers[idx]
        for job in self._meta.sends:
            parts = self._outgoing[job.req_id]
            for block_start, ids in self._chunks(job):
                if self.stager is not None:
                    self.stager.send(parts, idx, block_start, layout, ids)
                    continue
                views = layout.read(ids)
                for t in parts:  # held to the step's end: see OutgoingTransfer.send_chunk
                    self._counters["send_copies_bytes"] += t.send_chunk(idx, block_start, len(ids), views, hold=True)

    def wait_for_save(self) -> None:
        end_ns = time.time_ns()
        for job in self._meta.sends:
            start_ns = self._compute_start_ns.get(job.req_id, 0)
            for t in self._outgoing[job.req_id]:
                if self.stager is not None:  # its thread hands each chunk over as it copies it
                    if job.is_last:
                        self.stager.finish(t, start_ns, end_ns)
                elif job.is_last:
                    t.finish(start_ns, end_ns)
                else:
                    t.flush()

    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(finished_sending, finished_recving) for vLLM; also fills load errors and reports."""
        return self._finished_sends(finished_req_ids), self._finished_loads(finished_req_ids)

    def _finished_sends(self, finished_req_ids: set[str]) -> set[str]:
        self._finished_by_scheduler |= finished_req_ids & self._outgoing.keys()
        done = set()
        for req_id in list(self._finished_by_scheduler):
            parts = self._outgoing[req_id]
            for t in parts:
                if not t.result.done() and not t.finished_marked:
                    t.abort("request finished before its prompt was fully computed")
            if not all(t.result.done() for t in parts):
                continue
            results = [t.result.result() for t in parts]
            ok = all(res.state is TransferState.DONE for res in results)
            self._counters["sends_done" if ok else "sends_failed"] += 1
            for res in results:
                self._counters["sent_bytes"] += res.bytes
                log.info(
                    "KV push %s for %s: %s, %d chunks, %.1f MiB in %.1f ms%s",
                    res.transfer_id, req_id, res.state.name, res.chunks, res.bytes / 2**20,
                    res.elapsed_s * 1e3, f" ({res.error})" if res.error else "",
                )
            del self._outgoing[req_id]
            self._compute_start_ns.pop(req_id, None)
            self._finished_by_scheduler.discard(req_id)
            done.add(req_id)
        return done

    def _finished_loads(self, finished_req_ids: set[str]) -> set[str]:
        if self.receiver is None:
            return set()
        done = set()
        for req_id, job in list(self._loads.items()):
            if req_id in self._landing:  # its copies write into its blocks until they land
                parts, pending, start = self._landing[req_id]
                if not pending.done():
                    continue
                del self._landing[req_id]
                self._report_load(job, parts, "", pending.written_bytes, pending.written_bytes + pending.host_bytes,
                                  (time.perf_counter() - start) * 1e3)
            elif req_id in finished_req_ids:  # aborted while waiting: free its staging too
                for t in self._parts.pop(req_id, {}).values():
                    t.release()
                for pid in self._part_ids(job.transfer_id, job.src_tp).values():
                    self.receiver.discard(pid)
            elif not (wanted := self._part_ids(job.transfer_id, job.src_tp)):
                self._report_load(job, [], f"prefill TP size {job.src_tp} does not split the model's "
                                           f"{self.total_kv_heads} KV heads", 0, 0, 0.0)
            else:
                taken = self._parts.setdefault(req_id, {})
                for rank, pid in wanted.items():
                    if rank not in taken and (t := self.receiver.take(pid)) is not None:
                        taken[rank] = t
                if len(taken) < len(wanted):
                    continue
                del self._parts[req_id]
                if not self._load(job, taken):
                    continue
            del self._loads[req_id]
            done.add(req_id)
        return done

    def _load(self, job: LoadJob, parts: dict[int, IncomingTransfer]) -> bool:
        """Copy a finished transfer's parts into the job's blocks (of each part the heads this rank
        holds); False while a device load is landing."""
        part_block_bytes = self.layers[0].block_bytes // self.num_kv_heads * (self.total_kv_heads // job.src_tp)
        if error := parts_error(job, parts, part_block_bytes):
            self._report_load(job, list(parts.values()), error, 0, 0, 0.0)
            return True
        start = time.perf_counter()
        pieces = load_pieces(job, parts, self.layers, self.tp_rank, self.tp_size, self.total_kv_heads)
        if self.stager is not None:
            self._landing[job.req_id] = (list(parts.values()), self.stager.load(pieces), start)
            return False
        copied = sum(piece.write() for piece in pieces)
        self._report_load(job, list(parts.values()), "", copied, copied, (time.perf_counter() - start) * 1e3)
        return True

    def _report_load(self, job: LoadJob, parts: list[IncomingTransfer], error: str, written: int, copied: int,
                     load_ms: float) -> None:
        """Free the transfer's staging and record how its load went, for vLLM and the answer."""
        for t in parts:
            t.release()
        report = load_report(job, parts, error, written, load_ms, time.time_ns())
        self._reports[job.req_id] = report
        if error:
            self._invalid_blocks.update(job.block_ids)
            self._counters["loads_failed"] += 1
            log.warning("KV load for %s failed (%s): %d blocks reported invalid", job.req_id, error, len(job.block_ids))
        else:
            self._counters["loads_done"] += 1
            self._counters["received_bytes"] += sum(t.bytes_received for t in parts)
            self._counters["load_copies_bytes"] += copied
            log.info(
                "KV load %s for %s: %d tokens, %.1f MiB copied in %.1f ms, exposed %.1f ms of %.1f ms prefill",
                job.transfer_id, job.req_id, job.num_tokens, copied / 2**20, load_ms,
                report.exposed_ms, report.prefill_compute_ms,
            )

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def take_reports(self) -> dict[str, TransferReport]:
        out, self._reports = self._reports, {}
        return out
