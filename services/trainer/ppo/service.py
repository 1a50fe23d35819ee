"""rlhf.v1.TrainerService over the RunManager: start, watch and stop runs of the learner (the
same one `rlhf train ppo` runs)."""

from __future__ import annotations

import asyncio

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.ppo.runs import FINAL, RunManager

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, manager: RunManager):
        self.manager = manager

    async def StartRun(self, request, context):
        record = await self.manager.start(request.run_id, request.config)
        return trainer_pb2.StartRunResponse(run=record.to_proto())

    async def GetRun(self, request, context):
        return trainer_pb2.GetRunResponse(run=self.manager.get(request.run_id).to_proto())

    async def StopRun(self, request, context):
        record = await self.manager.stop(request.run_id)
        return trainer_pb2.StopRunResponse(run=record.to_proto())

    async def WatchRun(self, request, context):
        record = self.manager.get(request.run_id)
        sent = 0
        if request.from_step == 0:
            sent = len(record.history)  # only what happens from now on
        while True:
            while sent < len(record.history):
                update = record.history[sent]
                sent += 1
                if update.HasField("metrics") and update.metrics.step < request.from_step:
                    continue
                yield update
            if record.state in FINAL:
                return
            async with record.changed:
                try:
                    await asyncio.wait_for(record.changed.wait(), timeout=5.0)
                except TimeoutError:
                    pass
