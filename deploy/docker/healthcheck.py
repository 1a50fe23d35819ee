"""Container HEALTHCHECK for the images, and the Kubernetes probe of a gRPC service whose port
requires mutual TLS (the kubelet's native gRPC probe speaks plaintext only).

    healthcheck.py grpc HOST:PORT [SERVICE] [--tls DIR --server-name NAME]
        exit 0 if grpc.health.v1 says SERVING; with --tls, over mutual TLS with DIR/ca.crt,
        DIR/tls.crt and DIR/tls.key (a cert-manager Secret's layout), checking that the
        server's certificate names NAME
    healthcheck.py http URL                   exit 0 if GET URL answers 2xx

Standard library plus grpcio only, so the slim gateway image can run it too.
"""

from __future__ import annotations

import sys
import urllib.request


def _channel(target: str, tls_dir: str | None, server_name: str | None):
    import grpc

    if tls_dir is None:
        return grpc.insecure_channel(target)

    def read(name: str) -> bytes:
        with open(f"{tls_dir}/{name}", "rb") as fh:
            return fh.read()

    creds = grpc.ssl_channel_credentials(read("ca.crt"), read("tls.key"), read("tls.crt"))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, creds, options=options)


def check_grpc(target: str, service: str = "", tls_dir: str | None = None,
               server_name: str | None = None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(target, tls_dir, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def check_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:  # noqa: S310 - a local URL
            return 200 <= reply.status < 300
    except OSError:
        return False


def _options(argv: list[str]) -> tuple[list[str], dict[str, str]] | None:
    """Positional arguments and --tls / --server-name values; None if malformed."""
    names = {"--tls": "tls_dir", "--server-name": "server_name"}
    args, opts = [], {}
    it = iter(argv)
    for arg in it:
        if arg in names:
            value = next(it, None)
            if value is None:
                return None
            opts[names[arg]] = value
        else:
            args.append(arg)
    return args, opts


def main(argv: list[str]) -> int:
    parsed = _options(argv)
    if parsed is not None and 2 <= len(parsed[0]) <= 3 and parsed[0][0] == "grpc":
        args, opts = parsed
        try:
            ok = check_grpc(args[1], args[2] if len(args) > 2 else "", **opts)
        except OSError as exc:  # an unreadable certificate file
            print(f"healthcheck: {exc}", file=sys.stderr)
            return 1
        return 0 if ok else 1
    if len(argv) == 2 and argv[0] == "http":
        return 0 if check_http(argv[1]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
