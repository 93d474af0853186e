"""Wire encoding of KVFrame: byte-compatible with protobuf, zero-copy payloads, strict errors."""

from __future__ import annotations

import random

import crc32c
import numpy as np
import pytest

from pdserve.kvtransfer.framing import FrameError, checksum, decode, encode
from pdserve.proto import kvtransfer_pb2 as pb


def chunk_header(**kw) -> pb.KVFrame:
    fields = dict(transfer_id="t-1", layer=3, block_start=17, num_blocks=2, crc32c=0xDEADBEEF)
    return pb.KVFrame(chunk=pb.ChunkHeader(**{**fields, **kw}))


def parts_of(total: int, pieces: int = 3) -> list[memoryview]:
    data = bytes(random.Random(total).randrange(256) for _ in range(total))
    cuts = sorted({0, total, *(total * i // pieces for i in range(1, pieces))})
    return [memoryview(data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]


@pytest.mark.parametrize("size", [1, 127, 128, 300, 16383, 16384, 70_000])
def test_encoded_chunk_frame_is_byte_identical_to_protobuf_serialization(size):
    parts = parts_of(size)
    payload = b"".join(parts)
    reference = chunk_header()
    reference.payload = payload
    assert encode(chunk_header(), parts) == reference.SerializeToString()


@pytest.mark.parametrize("size", [1, 200, 70_000])
def test_protobuf_parses_our_encoding(size):
    parts = parts_of(size)
    msg = pb.KVFrame.FromString(encode(chunk_header(layer=5), parts))
    assert msg.WhichOneof("kind") == "chunk"
    assert (msg.chunk.transfer_id, msg.chunk.layer, msg.chunk.block_start) == ("t-1", 5, 17)
    assert msg.chunk.crc32c == 0xDEADBEEF
    assert msg.payload == b"".join(parts)


def test_numpy_float_parts_are_encoded_as_their_raw_bytes():
    a = np.arange(10, dtype=np.float32)
    b = np.arange(5, dtype=np.float64) * -1.5
    frame = encode(chunk_header(), [memoryview(a).cast("B"), memoryview(b).cast("B")])
    assert pb.KVFrame.FromString(frame).payload == a.tobytes() + b.tobytes()


def test_decode_reads_protobufs_own_serialization():
    ref = chunk_header(num_blocks=9)
    ref.payload = b"\x00\x01payload bytes\xff" * 50
    data = ref.SerializeToString()
    header, payload = decode(data)
    assert header.chunk == ref.chunk
    assert not header.payload
    assert payload.tobytes() == ref.payload


def test_decoded_payload_is_a_view_into_the_input_not_a_copy():
    ref = chunk_header()
    ref.payload = bytes(range(256)) * 8
    data = ref.SerializeToString()
    _, payload = decode(data)
    assert isinstance(payload, memoryview)
    assert payload.obj is data
    assert np.shares_memory(np.frombuffer(payload, np.uint8), np.frombuffer(data, np.uint8))


def test_mutating_the_input_buffer_is_visible_through_the_decoded_payload():
    ref = chunk_header()
    ref.payload = b"\x00" * 64
    data = bytearray(ref.SerializeToString())
    _, payload = decode(data)
    data[-1] = 0x7F
    assert payload[-1] == 0x7F


@pytest.mark.parametrize(
    "frame",
    [
        pb.KVFrame(open=pb.TransferOpen(transfer_id="x", num_tokens=5, num_blocks=1, lease_ms=100)),
        pb.KVFrame(end=pb.TransferEnd(transfer_id="x", num_chunks=4, total_bytes=1 << 40)),
        pb.KVFrame(),
    ],
    ids=["open", "end", "empty"],
)
def test_frames_without_payload_round_trip_with_an_empty_payload(frame):
    data = encode(frame)
    assert data == frame.SerializeToString()
    header, payload = decode(data)
    assert header == frame
    assert payload.nbytes == 0


def test_every_truncation_of_a_chunk_frame_raises_frame_error_except_at_field_boundaries():
    hdr = chunk_header()
    frame = encode(hdr, [memoryview(b"x" * 300)])
    header_len = len(hdr.SerializeToString())
    parsed = []
    for k in range(len(frame)):
        try:
            decode(frame[:k])
        except FrameError:
            continue
        parsed.append(k)
    assert parsed == [0, header_len]


@pytest.mark.parametrize(
    "data",
    [
        b"\x80",  # varint with continuation bit and nothing after
        b"\xff" * 11,  # varint longer than 64 bits
        b"\x0b",  # wire type 3 (start group)
        b"\x0f",  # wire type 7
        b"\x0a\x05ab",  # length-delimited field runs past the end
        b"\x7a\x10abc",  # payload field runs past the end
        b"\x09\x00\x00",  # fixed64 truncated
        b"\x0a\x02\xff\xff",  # submessage with a bad varint inside
        b"\x00\x01",  # field number 0
    ],
)
def test_malformed_frames_raise_frame_error(data):
    with pytest.raises(FrameError):
        decode(data)


def test_random_garbage_raises_only_frame_error():
    rng = random.Random(1234)
    failures = 0
    for _ in range(3000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        try:
            decode(data)
        except FrameError:
            failures += 1
    assert failures > 1500


def test_frame_error_is_a_value_error():
    assert issubclass(FrameError, ValueError)


def test_checksum_matches_the_crc32c_check_value():
    assert checksum([memoryview(b"123456789")]) == 0xE3069283


def test_checksum_over_parts_equals_checksum_over_their_concatenation():
    parts = parts_of(10_000, pieces=7)
    joined = b"".join(parts)
    assert checksum(parts) == checksum([memoryview(joined)]) == crc32c.crc32c(joined)
    assert checksum([memoryview(b"1234"), memoryview(b""), memoryview(b"56789")]) == 0xE3069283


def test_checksum_of_nothing_is_zero_and_detects_a_flipped_bit():
    assert checksum([]) == 0
    data = bytearray(b"some kv bytes" * 100)
    before = checksum([memoryview(data)])
    data[500] ^= 0x01
    assert checksum([memoryview(data)]) != before


def test_checksum_reads_numpy_views_of_any_dtype():
    arr = np.linspace(0, 1, 1000, dtype=np.float32)
    assert checksum([memoryview(arr).cast("B")]) == crc32c.crc32c(arr.tobytes())
