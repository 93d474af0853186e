"""The KV fingerprint: what two engines must share for raw block bytes to mean the same.

Each tensor-parallel rank has its own: its share of the KV heads (`num_kv_heads`) out of the
model's (`num_kv_heads * tp_size`). A layout names the heads' dimension `heads`, not its size,
so that ranks of engines with different TP sizes compare equal on it (`mismatches`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from pdserve.proto import kvtransfer_pb2 as pb


@dataclass(frozen=True)
class KVFingerprint:
    model: str
    dtype: str
    block_size: int
    kv_layout: str
    num_layers: int
    num_kv_heads: int
    """KV heads per layer held by this rank."""
    head_size: int
    tp_size: int = 1
    """Tensor-parallel ranks the model's KV heads are split over, `num_kv_heads` each."""

    @property
    def total_kv_heads(self) -> int:
        return self.num_kv_heads * self.tp_size

    def to_proto(self) -> pb.KVFingerprint:
        return pb.KVFingerprint(**asdict(self))

    @classmethod
    def from_proto(cls, msg: pb.KVFingerprint) -> "KVFingerprint":
        fp = cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})
        return fp if fp.tp_size else replace(fp, tp_size=1)

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of one block of one layer (K and V), from the dtype's element size."""
        return 2 * self.num_kv_heads * self.block_size * self.head_size * _itemsize(self.dtype)


SHARD_FIELDS = ("num_kv_heads", "tp_size")
"""What differs between ranks of engines with different TP sizes: compared as one, the model's heads."""


def mismatches(ours: KVFingerprint, theirs: KVFingerprint) -> list[str]:
    """Every field that differs, as `name: receiver=... sender=...`, for error messages; the
    two may hold different shares of the same KV heads (tensor parallelism)."""
    out = []
    for f in fields(KVFingerprint):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if f.name not in SHARD_FIELDS and a != b:
            out.append(f"{f.name}: receiver={a!r} sender={b!r}")
    if ours.total_kv_heads != theirs.total_kv_heads or theirs.num_kv_heads < 1:
        out.append(f"KV heads: receiver={ours.num_kv_heads} x {ours.tp_size} ranks "
                   f"sender={theirs.num_kv_heads} x {theirs.tp_size} ranks")
    return out


def layout_name(device: str, block_dim: int, block_shape: tuple[int, ...], heads_dim: int) -> str:
    """`kv_layout` of a cache: the heads' dimension by name, so ranks of any TP size compare equal."""
    dims = ", ".join("heads" if i == heads_dim else str(n) for i, n in enumerate(block_shape))
    return f"{device}:block_dim={block_dim}:block_shape=({dims})"


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}


def _itemsize(dtype: str) -> int:
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype!r}; known: {sorted(_ITEMSIZE)}") from None
