"""close() ends every channel a client opened, the direct ones to single replicas included, so
calls still in flight end at once and nothing is left connected; `async with` closes too."""

from __future__ import annotations

import asyncio

import pytest

from rlhf.clients import PolicyClient
from rlhf.formats import user_prompt
from rlhf.v1 import policy_pb2
from services.trainer.clients import Services
from tests.clients.helpers import FakePolicy, serve
from tests.fixtures.ports import free_port


async def _in_flight(*calls):
    tasks = [asyncio.create_task(c) for c in calls]
    await asyncio.sleep(0.5)  # the calls reached the server, which holds them for 30 s
    assert not any(t.done() for t in tasks)
    return tasks


async def _ended_cancelled(tasks):
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    for result in results:
        # grpc.aio cancels the calls of a closed channel: their awaits raise CancelledError.
        assert isinstance(result, asyncio.CancelledError), result


async def test_close_ends_balanced_and_direct_channels():
    port = free_port()
    server = await serve(FakePolicy("slow", delay=30), port)
    try:
        client = PolicyClient(f"127.0.0.1:{port}", timeout=60)
        request = policy_pb2.GenerateRequest(prompts=[user_prompt("hi")])
        tasks = await _in_flight(client.generate(request),
                                 client.list_adapters("run", endpoint=f"127.0.0.1:{port}"))
        await client.close()
        await _ended_cancelled(tasks)
        with pytest.raises(RuntimeError, match="closed"):
            client.stub_to(f"127.0.0.1:{port}")

        async with PolicyClient(f"127.0.0.1:{port}", timeout=60) as scoped:
            tasks = await _in_flight(scoped.generate(request))
        await _ended_cancelled(tasks)
    finally:
        await server.stop(0)


async def test_trainer_services_close_every_channel():
    policy_port, reward_port = free_port(), free_port()
    replica = FakePolicy("slow")
    server = await serve(replica, policy_port)
    try:
        services = Services([f"127.0.0.1:{policy_port}"], [f"127.0.0.1:{reward_port}"], "run",
                            retry_max=60)
        assert await services.newest_version() == 0  # opens a direct channel to the replica
        replica.delay = 30
        tasks = await _in_flight(services.newest_version(),
                                 services.policy.generate(policy_pb2.GenerateRequest(
                                     prompts=[user_prompt("hi")])))
        await services.close()
        await _ended_cancelled(tasks)
    finally:
        await server.stop(0)
