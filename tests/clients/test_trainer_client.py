"""TrainerClient against a minimal TrainerService on a real gRPC server: start, follow and stop
a run; a StartRun without a run id is never sent twice (a second one could start a second run)."""

from __future__ import annotations

import grpc
import pytest

from rlhf.clients import Backoff, CallFailed, TrainerClient
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from tests.fixtures.ports import free_port


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, busy_starts: int = 0):
        self.busy_starts = busy_starts  # StartRun calls answered RESOURCE_EXHAUSTED first
        self.starts: list[str] = []
        self.state = trainer_pb2.RUN_STATE_RUNNING

    async def StartRun(self, request, context):
        self.starts.append(request.run_id)
        if len(self.starts) <= self.busy_starts:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        return trainer_pb2.StartRunResponse(run=self._run(request.run_id or "generated"))

    async def GetRun(self, request, context):
        return trainer_pb2.GetRunResponse(run=self._run(request.run_id))

    async def StopRun(self, request, context):
        self.state = trainer_pb2.RUN_STATE_STOPPED
        return trainer_pb2.StopRunResponse(run=self._run(request.run_id))

    async def WatchRun(self, request, context):
        for step in range(max(1, request.from_step), 4):
            yield trainer_pb2.WatchRunResponse(metrics=trainer_pb2.StepMetrics(step=step))
        if request.run_id == "broken":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no run 'broken'")

    def _run(self, run_id: str) -> trainer_pb2.Run:
        return trainer_pb2.Run(run_id=run_id, state=self.state)


@pytest.fixture
async def trainer():
    fake, port = FakeTrainer(busy_starts=2), free_port()
    server = grpc.aio.server()
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(fake, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_start_watch_and_stop_a_run(trainer):
    fake, addr = trainer
    async with TrainerClient(addr, backoff=Backoff(max_seconds=10)) as client:
        with pytest.raises(CallFailed, match="RESOURCE_EXHAUSTED"):
            await client.start_run(trainer_pb2.RunConfig())  # no id: not repeated
        assert fake.starts == [""]
        run = await client.start_run(trainer_pb2.RunConfig(), "run-1")
        assert run.run_id == "run-1" and run.state == trainer_pb2.RUN_STATE_RUNNING
        assert fake.starts == ["", "run-1", "run-1"]  # with an id, a busy trainer is retried
        steps = [u.metrics.step async for u in client.watch_run("run-1", from_step=2)]
        assert steps == [2, 3]
        with pytest.raises(CallFailed, match=f"trainer at {addr} failed .*no run 'broken'"):
            async for _ in client.watch_run("broken"):
                pass
        stopped = await client.stop_run("run-1")
        assert stopped.state == trainer_pb2.RUN_STATE_STOPPED
        assert (await client.get_run("run-1")).state == trainer_pb2.RUN_STATE_STOPPED
