"""Cluster-secret authentication and TLS credentials for the KV channel."""

from __future__ import annotations

import hmac

import grpc

from pdserve.config.kvtransfer import KVTransferSettings

SECRET_METADATA_KEY = "x-pdserve-kv-secret"


def call_metadata(settings: KVTransferSettings) -> tuple[tuple[str, str], ...]:
    """Metadata a sender attaches to every call."""
    secret = settings.secret_value
    return ((SECRET_METADATA_KEY, secret),) if secret else ()


def is_authorized(settings: KVTransferSettings, metadata) -> bool:
    """Constant-time check of the caller's secret; no secret configured admits everyone."""
    expected = settings.secret_value
    if not expected:
        return True
    for key, value in metadata or ():
        if key == SECRET_METADATA_KEY:
            got = value if isinstance(value, str) else value.decode("utf-8", "replace")
            return hmac.compare_digest(got.encode(), expected.encode())
    return False


def server_credentials(settings: KVTransferSettings) -> grpc.ServerCredentials | None:
    """The receiver's TLS credentials; with a client CA, a sender without a certificate it signed
    is refused during the TLS handshake, before any call."""
    if settings.tls_cert_file is None:
        return None
    assert settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=None if client_ca is None else client_ca.read_bytes(),
        require_client_auth=client_ca is not None,
    )


def channel_credentials(settings: KVTransferSettings) -> grpc.ChannelCredentials | None:
    """The sender's TLS credentials, with its own certificate when one is configured."""
    if settings.tls_ca_file is None:
        return None
    cert, key = settings.tls_client_cert_file, settings.tls_client_key_file
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=None if key is None else key.read_bytes(),
        certificate_chain=None if cert is None else cert.read_bytes(),
    )
