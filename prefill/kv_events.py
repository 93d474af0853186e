"""An engine replica's feed of its prefix cache's changes to the controller: vLLM's KV cache
events (`kv_events_config`), published by the engine core over a ZMQ socket private to this
replica (ipc, so nothing listens on the network), collected on a thread here and handed over with
each load report (`engine.py`), which the controller's prefix index reads (`controller/prefix_index.py`).

Losing events costs only routing accuracy, so the feed never blocks the engine: past
`MAX_PENDING` events unreported, or on a gap in vLLM's sequence numbers, it drops what it holds
and tells the controller to forget this replica's cache, which the next events rebuild.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from typing import Any

from pdserve.controller.prefix_index import CacheEvent, CacheEvents, Cleared, Removed, Stored

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
"""Events held for the next report at most (each stored block carries its tokens)."""
POLL_MS = 200
"""How often the thread looks whether it is to stop."""


def events_endpoint(replica_id: str) -> str:
    """The replica's private socket for its engine's events (a short path: ipc paths are limited
    to about 100 bytes)."""
    return f"ipc://{tempfile.gettempdir()}/pdserve-kv-{os.getpid()}-{replica_id[:16]}"


def kv_events_config(endpoint: str) -> Any:
    """vLLM's config that has the engine publish its cache's changes on `endpoint`."""
    from vllm.config import KVEventsConfig

    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic="kv")


class KVEventFeed:
    """Collects the engine's KV cache events from `endpoint`; `take` hands over what came since."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._pending: list[CacheEvent] = []
        self._lost = False
        self._next_seq: int | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-events", daemon=True)
        self._thread.start()

    def take(self) -> CacheEvents:
        with self._lock:
            taken = CacheEvents(tuple(self._pending), self._lost)
            self._pending, self._lost = [], False
        return taken

    def lose(self) -> None:
        """Events taken were not delivered: the controller forgets this replica's cache at the next report."""
        with self._lock:
            self._lost = True

    def close(self) -> None:
        """Stop listening, and remove the socket's file (the engine that bound it goes with the replica)."""
        self._stopping.set()
        self._thread.join(timeout=2 * POLL_MS / 1000)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.endpoint.removeprefix("ipc://"))

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        sock.setsockopt(zmq.SUBSCRIBE, b"kv")
        try:
            while not self._stopping.is_set():
                if not sock.poll(POLL_MS):
                    continue
                _, seq_bytes, payload = sock.recv_multipart()
                try:
                    batch = decoder.decode(payload)
                except msgspec.DecodeError as exc:
                    log.warning("KV cache events: an undecodable batch (%s); the controller forgets this cache", exc)
                    self.lose()
                    continue
                self._add(int.from_bytes(seq_bytes, "big"), [e for e in map(_converted, batch.events) if e])
        finally:
            sock.close()

    def _add(self, seq: int, events: list[CacheEvent]) -> None:
        with self._lock:
            if self._next_seq is not None and seq != self._next_seq:
                log.warning("KV cache events: batches %d..%d lost; the controller forgets this cache",
                            self._next_seq, seq - 1)
                self._pending, self._lost = [], True
            self._next_seq = seq + 1
            self._pending += events
            if len(self._pending) > MAX_PENDING:
                log.warning("KV cache events: over %d unreported; the controller forgets this cache", MAX_PENDING)
                self._pending, self._lost = [], True


def _converted(event: Any) -> CacheEvent | None:
    """vLLM's event as the prefix index takes it; None for what it does not index (a cache group
    other than the first: sliding-window layers of hybrid models)."""
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    if isinstance(event, AllBlocksCleared):
        return Cleared()
    if getattr(event, "group_idx", None) not in (None, 0):
        return None
    if isinstance(event, BlockStored):
        return Stored(event.parent_block_hash, tuple(event.block_hashes), tuple(event.token_ids), event.block_size)
    if isinstance(event, BlockRemoved):
        return Removed(tuple(event.block_hashes))
    return None
