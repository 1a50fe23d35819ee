"""The policy service around its engine, over a real gRPC server on a FakeEngine: request
validation, admission, deadlines, GetInfo, health when the engine dies, and the engine's
lifecycle. Runs in `make test-fast`; test_generate.py runs the same requests on vLLM."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from rlhf.v1 import policy_pb2
from services.policy.adapters.store import AdapterStore
from services.policy.fake_engine import FakeEngine
from tests.fixtures.grpc_helpers import health_status
from tests.fixtures.policy_helpers import base, greedy, ids_prompt, stub, text_prompt
from tests.policy.conftest import start_fake_policy, stop_fake_policy
from tests.policy.helpers import assert_bad_request_refused, bad_requests


@pytest.mark.parametrize("case", list(bad_requests(512)))
async def test_bad_input_is_invalid_argument_or_not_found(fake_policy, case):
    await assert_bad_request_refused(fake_policy.channel, case)
    assert fake_policy.engine.pending_requests() == 0


async def test_bad_stream_input(fake_policy):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub(fake_policy.channel).GenerateStream(
                policy_pb2.GenerateStreamRequest(), timeout=30):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt is empty" in err.value.details()


async def test_a_batch_gets_each_prompts_tokens_and_usage(fake_policy):
    engine = fake_policy.engine
    resp = await stub(fake_policy.channel).Generate(policy_pb2.GenerateRequest(
        prompts=[ids_prompt([5, 6, 7]), ids_prompt([9, 10])],
        params=policy_pb2.SamplingParams(n=2, max_tokens=3, logprobs=True, seed=4),
    ), timeout=30)
    assert [r.prompt_index for r in resp.results] == [0, 1]
    for result, prompt in zip(resp.results, ([5, 6, 7], [9, 10]), strict=True):
        assert list(result.prompt_token_ids) == prompt
        assert result.served_by.base and not result.HasField("finished_by")
        for c in result.completions:
            assert list(c.token_ids) == [engine.token(prompt, c.index, k, 4, "")
                                         for k in range(3)]
            assert len(c.logprobs) == 3
            assert c.finish_reason == policy_pb2.FINISH_REASON_LENGTH
    assert resp.usage.prompt_tokens == 5 and resp.usage.completion_tokens == 12


async def test_admission_refuses_beyond_the_bound_at_once(fake_policy, monkeypatch):
    admission = fake_policy.app.servicer.admission
    monkeypatch.setattr(admission, "limit", 8)
    s = stub(fake_policy.channel)

    def request(n):
        return policy_pb2.GenerateRequest(
            prompts=[text_prompt("x")], params=policy_pb2.SamplingParams(n=n, max_tokens=2),
            adapter=base())

    async with fake_policy.engine.paused():  # admitted calls stay in flight
        first = asyncio.ensure_future(s.Generate(request(6), timeout=30))
        while admission.pending == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Generate(request(4), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "6 sequences in flight" in err.value.details()
        assert "limit 8" in err.value.details()
        exactly_full = asyncio.ensure_future(s.Generate(request(2), timeout=30))
        while admission.pending < 8:
            await asyncio.sleep(0.01)
    assert len((await first).results[0].completions) == 6  # the admitted calls are unaffected
    assert len((await exactly_full).results[0].completions) == 2
    assert admission.pending == 0


async def test_an_expired_deadline_or_a_cancelled_stream_ends_the_engine_request(fake_policy):
    engine = fake_policy.engine
    engine.token_delay = 0.05
    long = policy_pb2.SamplingParams(n=2, max_tokens=400)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(fake_policy.channel).Generate(policy_pb2.GenerateRequest(
            prompts=[text_prompt("go on")], params=long), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The handler ends once gRPC cancels it; on a loaded machine that can trail the deadline.
    admission = fake_policy.app.servicer.admission
    for _ in range(250):
        if engine.pending_requests() == 0 and admission.pending == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.pending_requests() == 0
    assert admission.pending == 0

    call = stub(fake_policy.channel).GenerateStream(policy_pb2.GenerateStreamRequest(
        prompt=text_prompt("go on"), params=long))
    async for chunk in call:
        if chunk.token_ids:
            break
    assert engine.pending_requests() == 1
    call.cancel()
    for _ in range(100):
        if engine.pending_requests() == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.pending_requests() == 0


async def test_a_stream_sends_served_by_then_tokens_then_usage(fake_policy):
    chunks = [c async for c in stub(fake_policy.channel).GenerateStream(
        policy_pb2.GenerateStreamRequest(prompt=ids_prompt([3, 4]), params=greedy(4)),
        timeout=30)]
    assert chunks[0].served_by.base and list(chunks[0].prompt_token_ids) == [3, 4]
    body = chunks[1:-1]
    assert [t for c in body for t in c.token_ids] == [
        fake_policy.engine.token([3, 4], 0, k, None, "") for k in range(4)]
    assert body[-1].finish_reason == policy_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 4


async def test_get_info_names_the_engine_and_its_health(fake_policy):
    s = stub(fake_policy.channel)
    info = await s.GetInfo(policy_pb2.PolicyServiceGetInfoRequest())
    assert info.engine == "fake 1.0"
    assert info.server.ready and info.server.service == "policy"
    assert info.adapter_mode == policy_pb2.ADAPTER_MODE_LORA
    assert info.base_model_id == "tiny" and info.max_model_len == 512

    fake_policy.engine.die("core process gone")
    info = await s.GetInfo(policy_pb2.PolicyServiceGetInfoRequest())
    assert not info.server.ready


async def test_a_dead_engine_turns_health_not_serving_and_calls_unavailable(fake_policy):
    assert await health_status(fake_policy.channel) == "SERVING"
    fake_policy.engine.die("core process gone")
    for _ in range(100):
        if await health_status(fake_policy.channel) == "NOT_SERVING":
            break
        await asyncio.sleep(0.05)
    assert await health_status(fake_policy.channel) == "NOT_SERVING"
    assert await health_status(fake_policy.channel, "rlhf.v1.PolicyService") == "NOT_SERVING"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(fake_policy.channel).Generate(policy_pb2.GenerateRequest(
            prompts=[text_prompt("x")], params=greedy(2)), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "core process gone" in err.value.details()


async def test_the_engine_is_entered_at_start_up_and_exited_at_shut_down(tiny_model_dir,
                                                                            tmp_path):
    engine = FakeEngine(vocab_size=512)
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data", engine=engine)
    assert (engine.entered, engine.exited, engine.running) == (1, 0, True)
    await stop_fake_policy(policy)
    assert (engine.entered, engine.exited, engine.running) == (1, 1, False)


async def test_a_failed_start_up_still_exits_the_engine(tiny_model_dir, tmp_path, monkeypatch):
    def unreadable(self):
        raise PermissionError("adapters folder unreadable")

    # Preparing the adapters fails after the engine started.
    monkeypatch.setattr(AdapterStore, "clear_staging", unreadable)
    engine = FakeEngine(vocab_size=512)
    with pytest.raises(PermissionError):
        await start_fake_policy(tiny_model_dir, tmp_path / "data", engine=engine)
    assert (engine.entered, engine.exited, engine.running) == (1, 1, False)
