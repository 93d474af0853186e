"""The KV fingerprint: what two engines must share for raw block bytes to mean the same."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pdserve.proto import kvtransfer_pb2 as pb


@dataclass(frozen=True)
class KVFingerprint:
    model: str
    dtype: str
    block_size: int
    kv_layout: str
    num_layers: int
    num_kv_heads: int
    head_size: int

    def to_proto(self) -> pb.KVFingerprint:
        return pb.KVFingerprint(**asdict(self))

    @classmethod
    def from_proto(cls, msg: pb.KVFingerprint) -> "KVFingerprint":
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of one block of one layer (K and V), from the dtype's element size."""
        return 2 * self.num_kv_heads * self.block_size * self.head_size * _itemsize(self.dtype)


def mismatches(ours: KVFingerprint, theirs: KVFingerprint) -> list[str]:
    """Every field that differs, as `name: ours=... theirs=...`, for error messages."""
    out = []
    for f in fields(KVFingerprint):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if a != b:
            out.append(f"{f.name}: receiver={a!r} sender={b!r}")
    return out


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}


def _itemsize(dtype: str) -> int:
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype!r}; known: {sorted(_ITEMSIZE)}") from None
