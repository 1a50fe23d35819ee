"""Typed client of the trainer service (`rlhf.v1.TrainerService`): start, follow and stop runs.

`token` is the trainer's admin token (every call) or its read token (GetRun and WatchRun only),
sent as `authorization: Bearer <token>` metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rlhf.clients.base import ServiceClient, new_request_id
from rlhf.clients.errors import call_failed
from rlhf.clients.retry import NO_RETRY
from rlhf.plumbing.auth import bearer_metadata
from rlhf.plumbing.interceptors import REQUEST_ID_KEY
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc


class TrainerClient(ServiceClient):
    service = "trainer"
    stub_class = trainer_pb2_grpc.TrainerServiceStub

    def __init__(self, *args, token: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._auth = bearer_metadata(token) if token else ()

    async def start_run(self, config: trainer_pb2.RunConfig, run_id: str = "", *,
                        timeout: float | None = None) -> trainer_pb2.Run:
        """Starts (or resumes) a run. Without a run id the server names it, so a call that may
        have reached it is not repeated (it could start a second run)."""
        request = trainer_pb2.StartRunRequest(run_id=run_id, config=config)
        response = await self.call("StartRun", lambda t, md: self.stub.StartRun(
            request, timeout=t, metadata=md + self._auth), timeout=timeout,
            backoff=None if run_id else NO_RETRY)
        return response.run

    async def get_run(self, run_id: str, *, timeout: float = 30.0) -> trainer_pb2.Run:
        response = await self.call("GetRun", lambda t, md: self.stub.GetRun(
            trainer_pb2.GetRunRequest(run_id=run_id), timeout=t, metadata=md + self._auth),
            timeout=timeout)
        return response.run

    async def stop_run(self, run_id: str, *, timeout: float = 30.0) -> trainer_pb2.Run:
        response = await self.call("StopRun", lambda t, md: self.stub.StopRun(
            trainer_pb2.StopRunRequest(run_id=run_id), timeout=t, metadata=md + self._auth),
            timeout=timeout)
        return response.run

    async def watch_run(self, run_id: str, from_step: int = 0, *,
                        timeout: float | None = None,
                        ) -> AsyncIterator[trainer_pb2.WatchRunResponse]:
        """Step metrics (replayed from `from_step`) and events until the run ends. The stream
        lasts as long as the run, so its deadline is `timeout` only when one is given."""
        call = self.stub.WatchRun(trainer_pb2.WatchRunRequest(run_id=run_id, from_step=from_step),
                                  timeout=timeout,
                                  metadata=((REQUEST_ID_KEY, new_request_id()), *self._auth))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise call_failed(self.service, self.address, "WatchRun", exc) from exc
        finally:
            call.cancel()
