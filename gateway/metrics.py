"""Gateway series (DESIGN.md decision 12). The route label is the route's path template, never
the raw path, so an attacker probing URLs cannot grow the series without bound; the tenant label
is an API key id (bounded by the configured keys) or "open" on a gateway without keys."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from rlhf.plumbing.metrics import counter, gauge, histogram

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
    canary_active: Gauge
    canary_version: Gauge
    canary_deadline: Gauge
    canary_requests: Counter
    canary_latency: Histogram
    canary_scored: Counter
    canary_reward: Gauge
    canary_decisions: Counter
    canary_apply_failures: Counter

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
            canary_active=gauge("rlhf_gateway_canary_active",
                                "1 while a canary trial runs or its verdict is being applied"),
            canary_version=gauge("rlhf_gateway_canary_version",
                                 "Adapter version of the latest canary trial"),
            canary_deadline=gauge("rlhf_gateway_canary_deadline_seconds",
                                  "Unix time by which the running canary's verdict is due "
                                  "(0: none running)"),
            canary_requests=counter("rlhf_gateway_canary_requests",
                                    "Requests of canary trials by arm (candidate, incumbent) and "
                                    "outcome (ok, error)", ("arm", "outcome")),
            canary_latency=histogram("rlhf_gateway_canary_request_seconds",
                                     "Policy latency of canary requests by arm", ("arm",)),
            canary_scored=counter("rlhf_gateway_canary_scored",
                                  "Canary answers scored on the reward service, by arm",
                                  ("arm",)),
            canary_reward=gauge("rlhf_gateway_canary_reward_mean",
                                "Mean reward of the running trial's answers, by arm", ("arm",)),
            canary_decisions=counter("rlhf_gateway_canary_decisions",
                                     "Canary verdicts: promoted, rolled_back, superseded",
                                     ("decision",)),
            canary_apply_failures=counter("rlhf_gateway_canary_apply_failures",
                                          "Replica calls that failed to apply a canary verdict "
                                          "(retried at the next poll)"),
        )
