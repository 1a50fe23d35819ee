"""Prometheus metrics: the gRPC request series every service shares, and the /metrics server.

Names follow `rlhf_<service>_<what>_<unit>`; labels are few and bounded (method and status code,
never a prompt or request id).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

# Latency buckets from 5 ms (health checks, small scores) to 10 min (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

_lock = threading.Lock()
_cache: dict[tuple[str, str], object] = {}


def _get_or_create(kind, name: str, doc: str, labels=(), registry=REGISTRY, **kwargs):
    """Metric objects are process-wide; a second server of the same service in one process (tests)
    reuses them instead of failing on duplicate registration."""
    key = (kind.__name__, name)
    with _lock:
        metric = _cache.get(key)
        if metric is None:
            metric = kind(name, doc, labels, registry=registry, **kwargs)
            _cache[key] = metric
        return metric


def counter(name: str, doc: str, labels=()) -> Counter:
    return _get_or_create(Counter, name, doc, labels)


def gauge(name: str, doc: str, labels=()) -> Gauge:
    return _get_or_create(Gauge, name, doc, labels)


def histogram(name: str, doc: str, labels=(), buckets=LATENCY_BUCKETS) -> Histogram:
    return _get_or_create(Histogram, name, doc, labels, buckets=buckets)


@dataclass
class RpcMetrics:
    """Series the server interceptor records for every RPC of one service."""

    requests: Counter
    latency: Histogram
    in_flight: Gauge

    @classmethod
    def for_service(cls, service: str) -> RpcMetrics:
        prefix = f"rlhf_{service}_grpc"
        return cls(
            requests=counter(
                f"{prefix}_requests", "gRPC calls handled, by method and status code",
                ("method", "code"),
            ),
            latency=histogram(
                f"{prefix}_request_duration_seconds", "gRPC call latency", ("method",)
            ),
            in_flight=gauge(
                f"{prefix}_requests_in_flight", "gRPC calls being handled", ("method",)
            ),
        )


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY):
    """Starts the /metrics HTTP server in a thread; returns (server, bound_port)."""
    server, _thread = _start_http_server(port, addr=host, registry=registry)
    return server, server.server_address[1]
