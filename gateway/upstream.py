"""The gateway's gRPC clients to policy and reward: one channel each (round_robin over every
replica), a deadline on every call, the request id passed along, latency and errors recorded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from gateway.errors import from_upstream
from gateway.metrics import GatewayMetrics
from rlhf.plumbing.channel import make_channel
from rlhf.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc

T = TypeVar("T")

# Readiness probes must answer fast even when an upstream hangs.
_PROBE_TIMEOUT = 2.0


class Upstreams:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics):
        self.config = config
        self.metrics = metrics
        self._policy_channel: grpc.aio.Channel | None = None
        self._reward_channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        tls = self.config.client_tls if self.config.client_tls.enabled else None
        self._policy_channel = make_channel(self.config.policy_addr, tls)
        self._reward_channel = make_channel(self.config.reward_addr, tls)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self._policy_channel)
        self.reward = reward_pb2_grpc.RewardServiceStub(self._reward_channel)

    async def close(self) -> None:
        for channel in (self._policy_channel, self._reward_channel):
            if channel is not None:
                await channel.close()

    async def _call(self, service: str, method: str, call: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            self.metrics.upstream_errors.labels(service, err.code().name).inc()
            raise from_upstream(service, err) from None
        finally:
            self.metrics.upstream_latency.labels(service, method).observe(
                time.perf_counter() - start)

    def _meta(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id),)

    async def generate(self, request: policy_pb2.GenerateRequest,
                       request_id: str) -> policy_pb2.GenerateResponse:
        return await self._call("policy", "Generate", lambda: self.policy.Generate(
            request, timeout=self.config.upstream_timeout_seconds,
            metadata=self._meta(request_id)))

    async def generate_stream(self, request: policy_pb2.GenerateStreamRequest,
                              request_id: str) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        """The stream's first message is awaited here, so an upstream failure surfaces as an
        HTTP error before any byte of the SSE response is sent; later failures end the stream."""
        call = self.policy.GenerateStream(request, timeout=self.config.upstream_timeout_seconds,
                                          metadata=self._meta(request_id))
        first = await self._call("policy", "GenerateStream", call.read)

        async def rest():
            try:
                if first is not grpc.aio.EOF:
                    yield first
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        return
                    yield msg
            finally:
                call.cancel()

        return rest()

    async def score(self, items: list[reward_pb2.ScoreItem], request_id: str) -> list[float]:
        response = await self._call("reward", "Score", lambda: self.reward.Score(
            reward_pb2.ScoreRequest(items=items), timeout=self.config.upstream_timeout_seconds,
            metadata=self._meta(request_id)))
        return [s.score for s in response.scores]

    async def list_adapters(self, request_id: str) -> policy_pb2.ListAdaptersResponse:
        return await self._call("policy", "ListAdapters", lambda: self.policy.ListAdapters(
            policy_pb2.ListAdaptersRequest(),
            timeout=min(10.0, self.config.upstream_timeout_seconds),
            metadata=self._meta(request_id)))

    async def _serving(self, channel: grpc.aio.Channel) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=_PROBE_TIMEOUT)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def readiness(self) -> dict[str, bool]:
        policy, reward = await asyncio.gather(self._serving(self._policy_channel),
                                              self._serving(self._reward_channel))
        return {"policy": policy, "reward": reward}
