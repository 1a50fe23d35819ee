"""TLS and mutual TLS on the shared server and client channel, with a CA made in the test."""

from __future__ import annotations

import grpc
import pytest

from rlhf.plumbing.channel import make_channel
from rlhf.plumbing.config import ClientTLS, ConfigError, ServerTLS
from rlhf.plumbing.server import GrpcServer
from tests.fixtures.certs import make_pki
from tests.fixtures.slow_app import SlowApp, SlowConfig


async def _echo(channel: grpc.aio.Channel) -> bytes:
    return await channel.unary_unary("/test.Slow/Sleep")(b"0", timeout=5)


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


async def _server(tls: ServerTLS) -> GrpcServer:
    cfg = SlowConfig.load(grpc_port=0, metrics_port=0, metrics_enabled=False, tls=tls,
                          drain_grace_seconds=1)
    return await GrpcServer(cfg, SlowApp()).start()


async def test_tls_server_accepts_tls_clients_and_refuses_plaintext(pki):
    srv = await _server(ServerTLS(cert_file=pki.server_cert, key_file=pki.server_key))
    addr = f"127.0.0.1:{srv.port}"
    try:
        async with make_channel(addr, ClientTLS(ca_file=pki.ca)) as ch:
            assert await _echo(ch) == b"0"
        async with make_channel(addr) as ch:  # plaintext
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _echo(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with make_channel(addr, ClientTLS(ca_file=pki.other_ca)) as ch:  # untrusted CA
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _echo(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.shutdown()


async def test_mutual_tls_requires_a_client_certificate(pki):
    srv = await _server(
        ServerTLS(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca)
    )
    addr = f"127.0.0.1:{srv.port}"
    try:
        with_cert = ClientTLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        async with make_channel(addr, with_cert) as ch:
            assert await _echo(ch) == b"0"
        async with make_channel(addr, ClientTLS(ca_file=pki.ca)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _echo(ch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.shutdown()


async def test_server_name_override_for_certificates_named_otherwise(pki):
    srv = await _server(ServerTLS(cert_file=pki.server_cert, key_file=pki.server_key))
    try:
        # The certificate names localhost and 127.0.0.1; dialling "127.0.0.1" with the override
        # set to the certificate's name works.
        tls = ClientTLS(ca_file=pki.ca, server_name_override="localhost")
        async with make_channel(f"127.0.0.1:{srv.port}", tls) as ch:
            assert await _echo(ch) == b"0"
    finally:
        await srv.shutdown()


async def test_tls_config_errors_name_the_problem(pki, tmp_path):
    with pytest.raises(ConfigError, match="key_file"):
        await _server(ServerTLS(cert_file=pki.server_cert))
    with pytest.raises(ConfigError, match="missing.pem"):
        await _server(ServerTLS(cert_file=tmp_path / "missing.pem", key_file=pki.server_key))
    with pytest.raises(ConfigError, match="go together"):
        make_channel("127.0.0.1:1", ClientTLS(ca_file=pki.ca, cert_file=pki.client_cert))


async def test_tls_from_environment_variables(pki, monkeypatch):
    monkeypatch.setenv("RLHF_TESTSVC_TLS__CERT_FILE", str(pki.server_cert))
    monkeypatch.setenv("RLHF_TESTSVC_TLS__KEY_FILE", str(pki.server_key))
    from pydantic_settings import SettingsConfigDict

    class EnvConfig(SlowConfig):
        model_config = SettingsConfigDict(env_prefix="RLHF_TESTSVC_")

    cfg = EnvConfig.load(grpc_port=0, metrics_enabled=False, drain_grace_seconds=1)
    assert cfg.tls.enabled
    srv = await GrpcServer(cfg, SlowApp()).start()
    try:
        async with make_channel(f"127.0.0.1:{srv.port}", ClientTLS(ca_file=pki.ca)) as ch:
            assert await _echo(ch) == b"0"
    finally:
        await srv.shutdown()
