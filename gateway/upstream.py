"""The gateway's calls to policy and reward over the shared clients (`rlhf.clients`): one
balanced channel each, a deadline on every call, the request id passed along, no retries (the
HTTP caller decides), and here the latency and error metrics and the mapping of a failed call to
an HTTP error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from gateway.config import GatewayConfig
from gateway.errors import from_upstream
from gateway.metrics import GatewayMetrics
from rlhf.clients import NO_RETRY, CallFailed, PolicyClient, RewardClient
from rlhf.v1 import policy_pb2, reward_pb2

T = TypeVar("T")

# Readiness probes must answer fast even when an upstream hangs.
_PROBE_TIMEOUT = 2.0


class Upstreams:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics):
        self.config = config
        self.metrics = metrics
        self.policy: PolicyClient | None = None
        self.reward: RewardClient | None = None
        # gateway.canary.Canary when canary_fraction > 0: `policy` requests go through it.
        self.canary = None

    async def open(self) -> None:
        common = dict(timeout=self.config.upstream_timeout_seconds, backoff=NO_RETRY)
        self.policy = PolicyClient(self.config.policy_addr, self.config.client_tls, **common)
        self.reward = RewardClient(self.config.reward_addr, self.config.client_tls, **common)

    async def close(self) -> None:
        for client in (self.policy, self.reward):
            if client is not None:
                await client.close()

    async def _call(self, service: str, method: str, call: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        try:
            return await call()
        except CallFailed as err:
            self.metrics.upstream_errors.labels(service, err.code.name).inc()
            raise from_upstream(service, err) from None
        finally:
            self.metrics.upstream_latency.labels(service, method).observe(
                time.perf_counter() - start)

    async def generate(self, request: policy_pb2.GenerateRequest,
                       request_id: str) -> policy_pb2.GenerateResponse:
        return await self._call("policy", "Generate", lambda: self.policy.generate(
            request, request_id=request_id))

    async def generate_stream(self, request: policy_pb2.GenerateStreamRequest,
                              request_id: str) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        """The stream's first message is awaited here, so an upstream failure surfaces as an
        HTTP error before any byte of the SSE response is sent; later failures end the stream."""
        return await self._call("policy", "GenerateStream", lambda: self.policy.generate_stream(
            request, request_id=request_id))

    async def score(self, items: list[reward_pb2.ScoreItem],
                    request_id: str) -> reward_pb2.ScoreResponse:
        """The scores in order, and the reward-model versions that produced them."""
        return await self._call("reward", "Score", lambda: self.reward.score_response(
            items, request_id=request_id))

    async def list_adapters(self, request_id: str) -> policy_pb2.ListAdaptersResponse:
        return await self._call("policy", "ListAdapters", lambda: self.policy.list_adapters(
            timeout=min(10.0, self.config.upstream_timeout_seconds), request_id=request_id))

    async def readiness(self) -> dict[str, bool]:
        policy, reward = await asyncio.gather(self.policy.serving(_PROBE_TIMEOUT),
                                              self.reward.serving(_PROBE_TIMEOUT))
        return {"policy": policy, "reward": reward}
