"""The gRPC API's transport: TLS and mutual TLS as `IngressConfig`'s grpc_tls_* files say, and a
port that is taken (a real grpc.aio server; requests: test_grpc_api.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.config.cluster import IngressConfig
from pdserve.deployments.api.grpc_api import server_credentials, start_grpc_server
from pdserve.ports import free_port
from tests.deployments.api.fake_grpc_frontend import FakeValidatingFrontend
from tests.tls_certs import TLSFiles, make_tls_files


@pytest.fixture
def frontend() -> FakeValidatingFrontend:
    return FakeValidatingFrontend()


@contextlib.asynccontextmanager
async def _serving(frontend: FakeValidatingFrontend, credentials: grpc.ServerCredentials | None = None
                   ) -> AsyncIterator[str]:
    """A gRPC API server on a free port for the block's duration; yields its address."""
    port = free_port()
    server = await start_grpc_server(lambda: frontend, port, credentials=credentials)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def _health_over(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    """The server's health over a new channel: plaintext, or TLS with `credentials`."""
    channel = grpc.aio.insecure_channel(address) if credentials is None else grpc.aio.secure_channel(
        address, credentials)
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return reply.status


def _client(ca: TLSFiles, signed_by: TLSFiles | None = None) -> grpc.ChannelCredentials:
    """A TLS client trusting `ca`'s server certificate, presenting the client certificate of `signed_by`."""
    if signed_by is None:
        return grpc.ssl_channel_credentials(ca.ca.read_bytes())
    return grpc.ssl_channel_credentials(ca.ca.read_bytes(), signed_by.client_key.read_bytes(),
                                        signed_by.client_cert.read_bytes())


def _tls(pki: TLSFiles, client_ca: bool = False) -> grpc.ServerCredentials | None:
    return server_credentials(IngressConfig(grpc_tls_cert_file=pki.server_cert, grpc_tls_key_file=pki.server_key,
                                            grpc_tls_client_ca_file=pki.ca if client_ca else None))


async def test_over_tls_a_client_trusting_the_ca_is_answered_and_a_plaintext_client_is_unavailable(frontend, tmp_path):
    pki = make_tls_files(tmp_path)
    async with _serving(frontend, _tls(pki)) as address:
        assert await _health_over(address, _client(pki)) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health_over(address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_with_a_client_ca_only_a_client_presenting_a_certificate_it_signed_is_answered(frontend, tmp_path):
    pki, other = make_tls_files(tmp_path / "ca"), make_tls_files(tmp_path / "other", ca_name="another CA")
    async with _serving(frontend, _tls(pki, client_ca=True)) as address:
        assert await _health_over(address, _client(pki, signed_by=pki)) == health_pb2.HealthCheckResponse.SERVING
        for refused in (_client(pki), _client(pki, signed_by=other)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _health_over(address, refused)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_without_tls_files_the_api_is_plaintext_and_an_unreadable_one_fails_naming_its_field_and_path(tmp_path):
    assert server_credentials(IngressConfig()) is None
    pki, missing = make_tls_files(tmp_path), tmp_path / "missing.pem"
    with pytest.raises(OSError, match=f"ingress.grpc_tls_client_ca_file: cannot read {missing}: No such file"):
        server_credentials(IngressConfig(grpc_tls_cert_file=pki.server_cert, grpc_tls_key_file=pki.server_key,
                                         grpc_tls_client_ca_file=missing))


async def test_a_second_server_on_a_taken_port_fails_to_start_instead_of_sharing_its_connections(frontend):
    async with _serving(frontend) as address:
        with pytest.raises(OSError, match=f"cannot bind {address}: the port is taken"):
            await start_grpc_server(lambda: frontend, int(address.rpartition(":")[2]))
        assert await _health_over(address) == health_pb2.HealthCheckResponse.SERVING
