"""Typed settings of the KV transfer layer, shared by sender, receiver and connector."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class KVTransferSettings(BaseModel):
    """How KV bytes move between a prefill and a decode engine.

    Read from the connector's `kv_connector_extra_config` (or a pdserve config
    file); every field has a default that works on one machine over loopback.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str = ""
    """Model name both sides put in the KV fingerprint; empty uses the served model name."""

    listen_addr: str = "127.0.0.1:0"
    """host:port the decode-side receiver binds; port 0 picks a free port."""

    secret: SecretStr = SecretStr("")
    """Cluster secret every KV call must carry; empty disables the check (tests only)."""

    require_secret: bool = True
    """Refuse to start a receiver without a secret, so a misconfigured cluster fails loudly."""

    chunk_bytes: int = Field(default=8 << 20, ge=4096, le=256 << 20)
    """Target payload bytes per chunk; a chunk always holds whole blocks (at least one)."""

    num_streams: int = Field(default=2, ge=1, le=16)
    """Concurrent Push streams per transfer, each on its own connection; chunks go round-robin."""

    lease_ms: int = Field(default=30_000, ge=100)
    """How long a receiver keeps a transfer's staging memory before declaring it FAILED."""

    max_lease_ms: int = Field(default=300_000, ge=100)
    """Upper bound the receiver applies to any lease a sender asks for."""

    max_frame_bytes: int = Field(default=64 << 20, ge=64 << 10)
    """Largest single gRPC message accepted; frames above it are refused."""

    max_staging_bytes: int = Field(default=4 << 30, ge=1 << 20)
    """Receiver-wide budget for staged payloads; new transfers are refused beyond it."""

    max_concurrent_calls: int = Field(default=256, ge=1)
    """gRPC calls a receiver serves at once (a transfer takes `num_streams`); further calls are
    refused (RESOURCE_EXHAUSTED), so callers without the secret cannot hold this process's memory."""

    receive_window_bytes: int = Field(default=8 << 20, ge=64 << 10, le=1 << 30)
    """HTTP/2 flow-control window of each call to the receiver, fixed instead of grown by gRPC's
    bandwidth-delay probing (which reaches 32 MiB): it bounds what any caller, with the secret or
    without, makes the receiver read ahead of its handler, and caps a stream at window / RTT (8 MiB
    over 1 ms: 8 GB/s per stream, times `num_streams`)."""

    connect_timeout_s: float = Field(default=10.0, gt=0)
    """How long a sender waits for the receiver's handshake before failing the transfer."""

    same_node: bool = True
    """Between a sender and a receiver on one host (one network namespace: one pod, or one
    machine), move payloads through shared memory handed over a Unix socket instead of the gRPC
    stream; control (open, checksums, end, leases, the secret) stays on gRPC either way."""

    same_node_pool_bytes: int = Field(default=1 << 30, ge=0)
    """Shared memory a sender keeps for reuse once receivers release it: fresh memory costs the
    kernel's page zeroing on every transfer, about as much as the copy itself."""

    tune_malloc: bool = True
    """Keep freed frame buffers in the heap (see malloc_tuning); frames must stay under 32 MiB."""

    tls_cert_file: Path | None = None
    """PEM certificate; with tls_key_file enables TLS on the receiver."""

    tls_key_file: Path | None = None
    """PEM private key of the receiver's certificate."""

    tls_ca_file: Path | None = None
    """PEM CA bundle the sender trusts; setting it makes the sender use TLS."""

    tls_client_ca_file: Path | None = None
    """PEM CA bundle the receiver checks senders' certificates against; setting it requires one (mutual TLS)."""

    tls_client_cert_file: Path | None = None
    """PEM certificate the sender presents; with tls_client_key_file, for receivers that require one."""

    tls_client_key_file: Path | None = None
    """PEM private key of the sender's certificate."""

    @model_validator(mode="after")
    def _tls_pair(self) -> "KVTransferSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("tls_client_cert_file and tls_client_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS on the receiver) needs tls_cert_file and tls_key_file")
        if self.tls_client_cert_file is not None and self.tls_ca_file is None:
            raise ValueError("tls_client_cert_file (the sender's certificate) needs tls_ca_file: "
                             "a sender presents it only over TLS")
        if self.chunk_bytes > self.max_frame_bytes - 4096:
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) must leave room for the frame header "
                f"within max_frame_bytes ({self.max_frame_bytes})"
            )
        return self

    @property
    def secret_value(self) -> str:
        return self.secret.get_secret_value()
