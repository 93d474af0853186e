"""Receiver side of the same-node path (see `same_node`): takes handed-over memory files, maps
them read-only for the transfers that claim them, and hands them back once unmapped."""

from __future__ import annotations

import asyncio
import fcntl
import hmac
import logging
import mmap
import os
import socket
import time
from collections.abc import Callable

from pdserve.kvtransfer.incoming import TransferRefused, check_transfer_id
from pdserve.kvtransfer.same_node import AUTH, MAX_PACKET_BYTES, OK, socket_name

log = logging.getLogger(__name__)

MAX_PENDING = 1024
"""Handed-over files a receiver holds before an open claims them; more are closed at once."""


class MappedSegment:
    """Receiver side: a read-only mapping of a handed-over file; `release` unmaps it and tells the
    sender it may reuse the file."""

    def __init__(self, fd: int, nbytes: int, on_release: Callable[[], None]):
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:  # not a memory file
            raise TransferRefused("INVALID_ARGUMENT", f"handed-over descriptor is not a sealed memory file: {exc}") from exc
        if not seals & fcntl.F_SEAL_SHRINK:
            raise TransferRefused("INVALID_ARGUMENT", "handed-over memory file is not sealed against shrinking")
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise TransferRefused("INVALID_ARGUMENT", f"handed-over memory file has {size} B, the transfer {nbytes} B")
        self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        self.view = memoryview(self._map)
        self._on_release = on_release

    def release(self) -> None:
        """Unmap, then let the sender reuse the file; views still held elsewhere keep it mapped
        and unreleased (the sender then never reuses it)."""
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            return
        self._on_release()


class HandoffServer:
    """Receiver side: takes descriptors on an abstract Unix socket, on the receiver's event loop.

    A connection's first packet must carry the secret; each later one is a transfer id with one
    descriptor. A file waits here until a gRPC open of that transfer claims it (at most
    `max_age_s`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, epoch: str, secret: str, max_connections: int,
                 max_age_s: float):
        self.name = socket_name(epoch)
        self._loop = loop
        self._secret = secret.encode()
        self._max_connections = max_connections
        self._max_age_s = max_age_s
        self._conns: dict[socket.socket, bool] = {}  # connection -> authenticated
        self._pending: dict[str, tuple[int, socket.socket, float]] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._sock.bind(self.name)
        self._sock.listen(64)
        loop.add_reader(self._sock, self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        if len(self._conns) >= self._max_connections:
            conn.close()
            return
        conn.setblocking(False)
        self._conns[conn] = False
        self._loop.add_reader(conn, self._read, conn)

    def _drop(self, conn: socket.socket, why: str = "") -> None:
        """Close a connection: a peer that broke the protocol (`why`), or one that hung up."""
        if why:
            log.warning("same-node KV connection dropped: %s", why)
        self._loop.remove_reader(conn)
        self._conns.pop(conn, None)
        conn.close()

    def _read(self, conn: socket.socket) -> None:
        try:
            packet, fds, flags, _ = socket.recv_fds(conn, MAX_PACKET_BYTES, 1, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(conn, str(exc))
            return
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or (not self._conns[conn] and fds) or len(fds) > 1:
            for fd in fds:
                os.close(fd)
            self._drop(conn, "oversized packet, several descriptors, or one before the secret")
            return
        if not packet and not fds:
            self._drop(conn)
            return
        if not self._conns[conn]:
            if not (packet.startswith(AUTH) and hmac.compare_digest(packet[len(AUTH):], self._secret)):
                self._drop(conn, "missing or wrong cluster secret")
                return
            try:
                conn.send(OK, socket.MSG_DONTWAIT)
            except OSError as exc:
                self._drop(conn, str(exc))
                return
            self._conns[conn] = True
            return
        if len(fds) != 1:
            self._drop(conn, "a transfer id without its descriptor")
            return
        self._offer(packet.decode("utf-8", "replace"), fds[0], conn)

    def _offer(self, transfer_id: str, fd: int, conn: socket.socket) -> None:
        try:
            check_transfer_id(transfer_id)
        except TransferRefused as exc:
            os.close(fd)
            self._drop(conn, str(exc))
            return
        if transfer_id in self._pending or len(self._pending) >= MAX_PENDING:
            os.close(fd)
            log.warning("same-node KV file for %s refused: already handed over, or %d waiting",
                        transfer_id, len(self._pending))
            return
        self._pending[transfer_id] = (fd, conn, time.monotonic())
        event = self._arrived.get(transfer_id)
        if event is not None:
            event.set()

    async def claim(self, transfer_id: str, nbytes: int) -> MappedSegment:
        """Map the file handed over for `transfer_id`, waiting for it at most `max_age_s`."""
        if transfer_id not in self._pending:
            event = self._arrived.setdefault(transfer_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), self._max_age_s)
            except TimeoutError as exc:
                raise TransferRefused("FAILED_PRECONDITION",
                                      f"no memory file handed over for a same-node transfer in {self._max_age_s} s"
                                      ) from exc
            finally:
                self._arrived.pop(transfer_id, None)
        entry = self._pending.pop(transfer_id, None)
        if entry is None:  # expired between its arrival and this wake-up
            raise TransferRefused("FAILED_PRECONDITION", "the transfer's memory file expired before its open")
        fd, conn, _ = entry
        try:
            return MappedSegment(fd, nbytes, lambda: self._release(conn, transfer_id))
        finally:
            os.close(fd)

    def _release(self, conn: socket.socket, transfer_id: str) -> None:
        """Any thread: tell the sender its file is free, from the loop that owns the connection."""
        try:
            self._loop.call_soon_threadsafe(self._send_release, conn, transfer_id)
        except RuntimeError:  # the receiver stopped
            pass

    def _send_release(self, conn: socket.socket, transfer_id: str) -> None:
        """Best effort: a sender that is gone or not reading allocates another file."""
        if conn in self._conns:
            try:
                conn.send(transfer_id.encode(), socket.MSG_DONTWAIT)
            except OSError:
                pass

    def expire(self, now_s: float) -> None:
        """Close files no open claimed in time."""
        for tid, (fd, _, at) in list(self._pending.items()):
            if now_s - at > self._max_age_s:
                del self._pending[tid]
                os.close(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._sock)
        self._sock.close()
        for conn in list(self._conns):
            self._drop(conn)
        for fd, _, _ in self._pending.values():
            os.close(fd)
        self._pending.clear()
