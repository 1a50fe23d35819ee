"""Retries of the shared clients against real gRPC servers on 127.0.0.1: a service that is not
up yet is waited for with growing, capped, jittered waits; one that stays down ends in an error
naming its address and the command that starts it; an answer retrying can't change is raised at
once."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from rlhf.clients import NO_RETRY, Backoff, CallFailed, GaveUp, PolicyClient, RewardClient
from rlhf.clients.errors import start_hint
from rlhf.formats import score_item
from tests.clients.helpers import FakePolicy, serve
from tests.fixtures.ports import free_port
from tests.fixtures.reward_helpers import start_reward


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter():
    plain = Backoff(initial=0.25, cap=2.0, jitter=0.0).delays()
    assert [next(plain) for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    jittered = Backoff(initial=1.0, cap=1.0, jitter=0.2).delays(random.Random(0))
    waits = [next(jittered) for _ in range(200)]
    assert all(0.8 <= w <= 1.2 for w in waits) and len(set(waits)) > 100


def test_start_hint_names_the_command_or_what_to_check():
    assert start_hint("policy", "127.0.0.1:50051") == \
        "start it with `rlhf serve policy --port 50051`"
    assert start_hint("reward", ["10.0.0.1:50052", "10.0.0.2:50052"]) == \
        "start it with `rlhf serve reward --port 50052`"
    assert "dns:///policy:50051 resolves" in start_hint("policy", "dns:///policy:50051")


async def test_waits_for_a_service_that_comes_up_then_answers():
    port = free_port()
    waits: list[str] = []
    recovered: list[bool] = []
    client = RewardClient(f"127.0.0.1:{port}", timeout=5, backoff=Backoff(max_seconds=30),
                          on_wait=waits.append, on_recover=lambda: recovered.append(True))

    async def come_up():
        await asyncio.sleep(1.5)
        return await start_reward(["rule:length?target=4"], grpc_port=port)

    starting = asyncio.create_task(come_up())
    try:
        scores = await client.score([score_item("one two three four", prompt="Count.")])
        assert scores == [pytest.approx(1.0)]
        assert len(waits) >= 2  # waited more than once: 0.25 s, 0.5 s, ... until it came up
        assert f"reward at 127.0.0.1:{port} is unavailable" in waits[0]
        assert f"`rlhf serve reward --port {port}`" in waits[0]
        assert recovered == [True]
    finally:
        await client.close()
        await (await starting).close()


async def test_gives_up_naming_the_address_and_the_command():
    port = free_port()
    waits: list[str] = []
    async with PolicyClient(f"127.0.0.1:{port}", backoff=Backoff(max_seconds=1.5),
                            on_wait=waits.append) as client:
        start = time.monotonic()
        with pytest.raises(GaveUp) as err:
            await client.get_info()
        assert time.monotonic() - start < 5
    message = str(err.value)
    assert f"policy at 127.0.0.1:{port} is unavailable" in message
    assert "GetInfo: UNAVAILABLE" in message
    assert f"start it with `rlhf serve policy --port {port}`" in message
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.address.endswith(str(port))
    assert waits  # it did wait before giving up

    async with PolicyClient(f"127.0.0.1:{port}", backoff=NO_RETRY, on_wait=waits.append) as fast:
        waits.clear()
        with pytest.raises(CallFailed) as err:
            await fast.get_info()
    assert not isinstance(err.value, GaveUp) and not waits
    assert f"`rlhf serve policy --port {port}`" in str(err.value)


async def test_an_answer_is_not_retried_and_the_request_id_travels():
    port = free_port()
    replica = FakePolicy("a")
    server = await serve(replica, port)
    waits: list[str] = []
    try:
        async with PolicyClient(f"127.0.0.1:{port}", on_wait=waits.append) as client:
            request = _pinned("run", 3)
            with pytest.raises(CallFailed) as err:
                await client.generate(request, request_id="req-42")
            assert err.value.code == grpc.StatusCode.NOT_FOUND and not waits
            assert replica.generate_calls == 1 and replica.request_ids == ["req-42"]
            assert "run@v3 is not kept" in str(err.value)
            await client.generate(_pinned("", 0, pinned=False))
            assert replica.request_ids[-1]  # a fresh id when the caller has none
    finally:
        await server.stop(0)


def _pinned(name: str, version: int, pinned: bool = True):
    from rlhf.formats import user_prompt
    from rlhf.v1 import policy_pb2

    selector = (policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_PINNED,
                                           pinned=policy_pb2.AdapterRef(name=name,
                                                                        version=version))
                if pinned else policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_BASE))
    return policy_pb2.GenerateRequest(prompts=[user_prompt("hi")], adapter=selector)
