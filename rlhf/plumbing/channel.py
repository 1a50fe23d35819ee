"""Client channels to peer services: one target string or several addresses, balanced per call.

A peer is given as `host:port`, several of them, or a `dns:///name:port` that resolves to every
replica (a Kubernetes headless Service). The channel uses gRPC's `round_robin`, so consecutive
calls go to different replicas.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence

import grpc

from rlhf.plumbing.config import ClientTLS
from rlhf.plumbing.tls import channel_credentials

_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        # Calls answered UNAVAILABLE (replica loading, draining or restarting) are retried, on
        # the next replica under round_robin. Replaying them is safe because the services answer
        # UNAVAILABLE only for a call whose work was not done (or was lost with the engine); any
        # other answer is returned as is, since Generate is not idempotent without a seed.
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def _split_host_port(addr: str) -> tuple[str, str]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {addr!r} must be host:port")
    return host.strip("[]"), port


def target_for(addrs: str | Sequence[str]) -> str:
    """One gRPC target for one or more addresses.

    Several IP literals become an `ipv4:`/`ipv6:` list target (gRPC balances over it); a single
    address or a `dns:///` name is used as is. Several host names can't share one target: resolve
    them yourself with `endpoints()` or use a DNS name that covers them all."""
    if isinstance(addrs, str):
        addrs = [a for a in (part.strip() for part in addrs.split(",")) if a]
    if not addrs:
        raise ValueError("no address given")
    if len(addrs) == 1:
        return addrs[0]
    families = set()
    parts = []
    for addr in addrs:
        host, port = _split_host_port(addr)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"several addresses must be IP literals ({addr!r} is not); use a dns:/// name"
            ) from None
        families.add(ip.version)
        parts.append(f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}")
    if len(families) > 1:
        raise ValueError("cannot mix IPv4 and IPv6 addresses in one target")
    return ("ipv6:" if families == {6} else "ipv4:") + ",".join(parts)


def endpoints(addrs: str | Sequence[str]) -> list[str]:
    """Every replica address behind `addrs` (resolving `dns:///` names), e.g. to push an adapter
    to each policy replica."""
    if isinstance(addrs, str):
        addrs = [a for a in (part.strip() for part in addrs.split(",")) if a]
    out: list[str] = []
    for addr in addrs:
        if addr.startswith("dns:"):
            name = addr.split("dns:", 1)[1].lstrip("/")
            if "/" in name:  # dns://authority/name form
                name = name.split("/", 1)[1]
            host, port = _split_host_port(name)
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            for info in infos:
                ip = info[4][0]
                ep = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                if ep not in out:
                    out.append(ep)
        elif addr.startswith(("ipv4:", "ipv6:")):
            out.extend(p for p in addr.split(":", 1)[1].split(",") if p not in out)
        elif addr not in out:
            out.append(addr)
    return out


def make_channel(
    addrs: str | Sequence[str],
    tls: ClientTLS | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
) -> grpc.aio.Channel:
    """An asyncio channel to a peer service, balanced per call, plaintext unless tls is on."""
    options = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Detect a dead peer within ~30 s even when no call is running.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    target = target_for(addrs)
    creds = channel_credentials(tls) if tls is not None else None
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    if tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return grpc.aio.secure_channel(target, creds, options=options)
