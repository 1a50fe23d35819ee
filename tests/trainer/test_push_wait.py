"""The trainer's adapter push waits for an unreachable policy replica (restarting) instead of
failing the run, and does not wait on a replica that refuses the adapter itself. The replica here
is a minimal PushAdapter servicer on a real gRPC server (the push path is what is under test)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.trainer.clients import GaveUp, Services
from tests.fixtures.ports import free_port


class PushOnly(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.received: list[int] = []

    async def PushAdapter(self, request_iterator, context):
        header = None
        async for part in request_iterator:
            if part.HasField("header"):
                header = part.header
        if self.refuse:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rank 64 exceeds max 16")
        self.received.append(header.adapter.version)
        return policy_pb2.PushAdapterResponse(activated=True)


async def serve(servicer, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@pytest.fixture
def adapter(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "adapter_config.json").write_text("{}")
    return tmp_path


async def test_push_waits_for_a_restarting_replica(adapter):
    port = free_port()
    waits: list[str] = []
    recovered: list[bool] = []
    services = Services([f"127.0.0.1:{port}"], [f"127.0.0.1:{free_port()}"], "policy",
                        retry_max=60, on_wait=waits.append,
                        on_recover=lambda: recovered.append(True))
    replica = PushOnly()

    async def come_back():
        await asyncio.sleep(3)
        return await serve(replica, port)

    starting = asyncio.create_task(come_back())
    result = await services.push(adapter, 4, "tiny", None, quorum=1.0, attempts=1)
    server = await starting
    try:
        assert result.confirmed == [f"127.0.0.1:{port}"] and not result.refused
        assert replica.received == [4]
        assert waits and "unreachable" in waits[0] and "waiting" in waits[0]
        assert recovered == [True]
    finally:
        await server.stop(0)


async def test_push_gives_up_on_a_refusal_and_after_retry_max(adapter):
    port = free_port()
    server = await serve(PushOnly(refuse=True), port)
    services = Services([f"127.0.0.1:{port}"], [f"127.0.0.1:{free_port()}"], "policy",
                        retry_max=600)
    try:
        with pytest.raises(GaveUp, match="INVALID_ARGUMENT"):
            await services.push(adapter, 2, "tiny", None, quorum=1.0, attempts=2)
    finally:
        await server.stop(0)
    down = Services([f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"], "policy",
                    retry_max=2)
    with pytest.raises(GaveUp, match="UNAVAILABLE"):
        await down.push(adapter, 3, "tiny", None, quorum=1.0, attempts=1)
