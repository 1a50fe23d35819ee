"""Container HEALTHCHECK for the images (Kubernetes uses its own native probes instead).

    healthcheck.py grpc HOST:PORT [SERVICE]   exit 0 if grpc.health.v1 says SERVING
    healthcheck.py http URL                   exit 0 if GET URL answers 2xx

Standard library plus grpcio only, so the slim gateway image can run it too.
"""

from __future__ import annotations

import sys
import urllib.request


def check_grpc(target: str, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
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


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "grpc":
        return 0 if check_grpc(argv[1], argv[2] if len(argv) > 2 else "") else 1
    if len(argv) == 2 and argv[0] == "http":
        return 0 if check_http(argv[1]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
