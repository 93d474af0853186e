from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_STATE_UNSPECIFIED: _ClassVar[TransferState]
    WAITING: _ClassVar[TransferState]
    TRANSFERRING: _ClassVar[TransferState]
    DONE: _ClassVar[TransferState]
    FAILED: _ClassVar[TransferState]
TRANSFER_STATE_UNSPECIFIED: TransferState
WAITING: TransferState
TRANSFERRING: TransferState
DONE: TransferState
FAILED: TransferState

class KVFingerprint(_message.Message):
    __slots__ = ("model", "dtype", "block_size", "kv_layout", "num_layers", "num_kv_heads", "head_size", "tp_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    block_size: int
    kv_layout: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    tp_size: int
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., kv_layout: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_size: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("fingerprint", "sender_id")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    fingerprint: KVFingerprint
    sender_id: str
    def __init__(self, fingerprint: _Optional[_Union[KVFingerprint, _Mapping]] = ..., sender_id: _Optional[str] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("receiver_id", "epoch", "max_frame_bytes", "same_node_socket")
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAME_NODE_SOCKET_FIELD_NUMBER: _ClassVar[int]
    receiver_id: str
    epoch: str
    max_frame_bytes: int
    same_node_socket: str
    def __init__(self, receiver_id: _Optional[str] = ..., epoch: _Optional[str] = ..., max_frame_bytes: _Optional[int] = ..., same_node_socket: _Optional[str] = ...) -> None: ...

class TransferOpen(_message.Message):
    __slots__ = ("transfer_id", "fingerprint", "num_tokens", "num_blocks", "lease_ms", "trace_parent", "epoch", "first_block", "same_node")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_PARENT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    SAME_NODE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    fingerprint: KVFingerprint
    num_tokens: int
    num_blocks: int
    lease_ms: int
    trace_parent: str
    epoch: str
    first_block: int
    same_node: bool
    def __init__(self, transfer_id: _Optional[str] = ..., fingerprint: _Optional[_Union[KVFingerprint, _Mapping]] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., lease_ms: _Optional[int] = ..., trace_parent: _Optional[str] = ..., epoch: _Optional[str] = ..., first_block: _Optional[int] = ..., same_node: _Optional[bool] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("transfer_id", "layer", "block_start", "num_blocks", "crc32c")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    layer: int
    block_start: int
    num_blocks: int
    crc32c: int
    def __init__(self, transfer_id: _Optional[str] = ..., layer: _Optional[int] = ..., block_start: _Optional[int] = ..., num_blocks: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class TransferEnd(_message.Message):
    __slots__ = ("transfer_id", "num_chunks", "total_bytes", "compute_start_unix_ns", "compute_end_unix_ns")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    num_chunks: int
    total_bytes: int
    compute_start_unix_ns: int
    compute_end_unix_ns: int
    def __init__(self, transfer_id: _Optional[str] = ..., num_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., compute_start_unix_ns: _Optional[int] = ..., compute_end_unix_ns: _Optional[int] = ...) -> None: ...

class KVFrame(_message.Message):
    __slots__ = ("open", "chunk", "end", "payload")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    open: TransferOpen
    chunk: ChunkHeader
    end: TransferEnd
    payload: bytes
    def __init__(self, open: _Optional[_Union[TransferOpen, _Mapping]] = ..., chunk: _Optional[_Union[ChunkHeader, _Mapping]] = ..., end: _Optional[_Union[TransferEnd, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("transfer_id", "state", "chunks_received", "bytes_received", "error")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    state: TransferState
    chunks_received: int
    bytes_received: int
    error: str
    def __init__(self, transfer_id: _Optional[str] = ..., state: _Optional[_Union[TransferState, str]] = ..., chunks_received: _Optional[int] = ..., bytes_received: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...
