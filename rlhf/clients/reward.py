"""Typed client of the reward service (`rlhf.v1.RewardService`), balanced over every replica."""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.clients.base import ServiceClient
from rlhf.v1 import reward_pb2, reward_pb2_grpc


class RewardClient(ServiceClient):
    service = "reward"
    stub_class = reward_pb2_grpc.RewardServiceStub

    async def score_response(self, items: Sequence[reward_pb2.ScoreItem], *,
                             timeout: float | None = None,
                             request_id: str | None = None) -> reward_pb2.ScoreResponse:
        """The whole answer: each item's score and its parts by scorer."""
        request = reward_pb2.ScoreRequest(items=list(items))
        return await self.call("Score", lambda t, md: self.stub.Score(
            request, timeout=t, metadata=md), timeout=timeout, request_id=request_id)

    async def score(self, items: Sequence[reward_pb2.ScoreItem], *,
                    timeout: float | None = None, request_id: str | None = None) -> list[float]:
        """One score per item, in order (build items with `rlhf.formats.score_item`)."""
        response = await self.score_response(items, timeout=timeout, request_id=request_id)
        return [s.score for s in response.scores]

    async def get_info(self, *, timeout: float = 30.0, request_id: str | None = None,
                       ) -> reward_pb2.RewardServiceGetInfoResponse:
        return await self.call("GetInfo", lambda t, md: self.stub.GetInfo(
            reward_pb2.RewardServiceGetInfoRequest(), timeout=t, metadata=md),
            timeout=timeout, request_id=request_id)
