"""gRPC credentials from the TLS sections of a service config."""

from __future__ import annotations

from pathlib import Path

import grpc

from rlhf.plumbing.config import ClientTLS, ConfigError, ServerTLS


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS {what} {path}: {exc.strerror}") from None


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials | None:
    """None when TLS is off. With client_ca_file, clients must present a certificate (mTLS)."""
    if not tls.enabled:
        return None
    if tls.key_file is None:
        raise ConfigError("tls.cert_file is set but tls.key_file is not")
    cert = _read(tls.cert_file, "certificate")
    key = _read(tls.key_file, "key")
    client_ca = _read(tls.client_ca_file, "client CA")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials | None:
    """None when TLS is off (plaintext channel)."""
    if not tls.enabled:
        return None
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("client_tls.cert_file and client_tls.key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "CA"),
        private_key=_read(tls.key_file, "client key"),
        certificate_chain=_read(tls.cert_file, "client certificate"),
    )
