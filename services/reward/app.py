"""Wires the reward servicer into the shared server. Scoring lands with issue #4; until then the
service starts, reports health and answers GetInfo."""

from __future__ import annotations

import grpc

from rlhf.plumbing.command import service_command
from rlhf.plumbing.info import not_yet, server_info
from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.reward.config import RewardConfig

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, app: RewardApp):
        self.app = app

    async def Score(self, request, context):
        raise not_yet("Score", 4)

    async def GetInfo(self, request, context):
        cfg = self.app.config
        return reward_pb2.RewardServiceGetInfoResponse(
            server=server_info("reward", self.app.ready),
            max_batch_items=cfg.max_batch_items,
            max_text_chars=cfg.max_text_chars,
        )


class RewardApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: RewardConfig):
        self.config = config
        self.ready = False

    def register(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(self), server)

    async def startup(self) -> None:
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False


command = service_command(RewardConfig, RewardApp)
