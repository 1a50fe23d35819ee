"""Wires the trainer servicer into the shared server. Runs land with issue #5; until then the
service starts and reports health."""

from __future__ import annotations

import grpc

from rlhf.plumbing.command import service_command
from rlhf.plumbing.info import not_yet
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.config import TrainerConfig

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    async def StartRun(self, request, context):
        raise not_yet("StartRun", 5)

    async def GetRun(self, request, context):
        raise not_yet("GetRun", 5)

    async def StopRun(self, request, context):
        raise not_yet("StopRun", 5)

    async def WatchRun(self, request, context):
        raise not_yet("WatchRun", 5)
        yield  # pragma: no cover - makes this an async generator like the real one


class TrainerApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: TrainerConfig):
        self.config = config

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(), server)

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


command = service_command(TrainerConfig, TrainerApp)
