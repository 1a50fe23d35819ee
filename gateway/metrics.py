"""Gateway series (DESIGN.md decision 12). The route label is the route's path template, never
the raw path, so an attacker probing URLs cannot grow the series without bound; the tenant label
is an API key id (bounded by the configured keys) or "open" on a gateway without keys."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from rlhf.plumbing.metrics import counter, histogram

N_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class GatewayMetrics:
    requests: Counter
    latency: Histogram
    best_of_n: Histogram
    upstream_latency: Histogram
    upstream_errors: Counter
    feedback: Counter
    budget_refusals: Counter

    @classmethod
    def create(cls) -> GatewayMetrics:
        return cls(
            requests=counter("rlhf_gateway_http_requests", "HTTP requests by route and status",
                             ("route", "status")),
            latency=histogram("rlhf_gateway_http_request_seconds",
                              "HTTP request latency by route", ("route",)),
            best_of_n=histogram("rlhf_gateway_best_of_n", "Candidates sampled per ranked request",
                                buckets=N_BUCKETS),
            upstream_latency=histogram("rlhf_gateway_upstream_seconds",
                                       "Latency of calls to policy and reward",
                                       ("service", "method")),
            upstream_errors=counter("rlhf_gateway_upstream_errors",
                                    "Failed calls to policy and reward by gRPC code",
                                    ("service", "code")),
            feedback=counter("rlhf_gateway_feedback", "Feedback records stored, by kind and tenant",
                             ("kind", "tenant")),
            budget_refusals=counter("rlhf_gateway_budget_refusals",
                                    "Requests refused with 429 by tenant and budget "
                                    "(requests, sequences, tokens)", ("tenant", "budget")),
        )
