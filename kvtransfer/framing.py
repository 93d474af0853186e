"""Zero-copy wire encoding of `KVFrame` messages.

A frame is a normal protobuf `KVFrame` (any protobuf library can read it), but
the payload field is written and read by hand: the sender assembles header and
tensor memory into one `bytes` (one copy, straight from the KV cache), and the
receiver slices the payload out of gRPC's buffer without copying it.
"""

from __future__ import annotations

from collections.abc import Sequence

import crc32c as _crc32c

from pdserve.proto import kvtransfer_pb2 as pb

_PAYLOAD_FIELD = 15
_PAYLOAD_TAG = bytes([(_PAYLOAD_FIELD << 3) | 2])  # field 15, length-delimited

MAX_HEADER_BYTES = 4096
"""Most bytes a frame may hold beyond its payload (an open frame's fingerprint included)."""


class FrameError(ValueError):
    """A frame that does not parse as a KVFrame."""


def checksum(parts: Sequence[memoryview]) -> int:
    """CRC-32C over the concatenation of `parts` (hardware-accelerated, no copy)."""
    value = 0
    for part in parts:
        value = _crc32c.crc32c(part, value)
    return value


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(header: pb.KVFrame, parts: Sequence[memoryview] = ()) -> bytes:
    """Serialize `header` followed by the payload made of `parts`.

    `header` must not have `payload` set. The join is the only copy of the
    payload bytes on the sending side.
    """
    size = sum(p.nbytes for p in parts)
    head = header.SerializeToString()
    if not parts:
        return head
    return b"".join([head, _PAYLOAD_TAG, _varint(size), *parts])


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise FrameError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise FrameError("varint too long")


def decode(data: bytes) -> tuple[pb.KVFrame, memoryview]:
    """Parse a frame; the payload is returned as a view into `data` (no copy).

    The view keeps all of `data` alive while a chunk is staged, so a frame must be exactly its
    header (as protobuf writes it: no unknown, repeated or padding fields) and one payload, and
    its header at most `MAX_HEADER_BYTES`: a sender cannot make a small chunk hold a large frame."""
    buf = memoryview(data)
    pos = 0
    payload: memoryview | None = None
    header_parts: list[memoryview] = []
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if field == _PAYLOAD_FIELD:
                if pos + length > len(buf):
                    raise FrameError("payload runs past the end of the frame")
                if payload is not None:
                    raise FrameError("a frame carries one payload")
                payload = buf[pos : pos + length]
                pos += length
                continue
            pos += length
        else:
            raise FrameError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise FrameError("field runs past the end of the frame")
        header_parts.append(buf[start:pos])
    header_bytes = sum(p.nbytes for p in header_parts)
    if header_bytes > MAX_HEADER_BYTES:
        raise FrameError(f"header of {header_bytes} B exceeds {MAX_HEADER_BYTES} B")
    try:
        header = pb.KVFrame.FromString(b"".join(header_parts))
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise FrameError(f"bad frame header: {exc}") from exc
    header.DiscardUnknownFields()
    if header.ByteSize() != header_bytes:
        raise FrameError(f"{header_bytes - header.ByteSize()} B of the header are unknown, repeated or default fields")
    return header, payload if payload is not None else memoryview(b"")
