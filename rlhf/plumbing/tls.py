"""gRPC credentials from the TLS sections of a service config."""

from __future__ import annotations

from collections.abc import Sequence
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


def tls_for_endpoint(tls: ClientTLS | None, addrs: Sequence[str]) -> ClientTLS | None:
    """The TLS to dial one replica that `addrs` resolved to. A `dns:///name:port` peer resolves
    to pod IPs, which no certificate names: the replica is checked against `name`, the name its
    certificate is issued for, unless `server_name_override` already says otherwise."""
    if tls is None or not tls.enabled or tls.server_name_override:
        return tls
    names = {_dns_host(a) for a in addrs}
    if len(names) != 1 or None in names:
        return tls
    return tls.model_copy(update={"server_name_override": names.pop()})


def _dns_host(addr: str) -> str | None:
    if not addr.startswith("dns:"):
        return None
    name = addr.split("dns:", 1)[1].lstrip("/")
    if "/" in name:  # dns://authority/name form
        name = name.split("/", 1)[1]
    return name.rpartition(":")[0].strip("[]") or None
