"""merged adapter mode on a real policy server: the active adapter is merged into the weights in
place; same push/rollback semantics; other versions and the base model are refused clearly."""

from __future__ import annotations

import asyncio
import time

import cloudpickle
import grpc
import pytest

from rlhf.clients.push import push_adapter
from rlhf.v1 import policy_pb2
from services.policy.vllm_backend.merge import reload_merged
from tests.fixtures.policy_helpers import (
    ADMIN,
    base,
    generate_greedy,
    greedy,
    hf_greedy,
    ids_prompt,
    make_adapter,
    pinned,
    run_hot_swap,
    set_active,
    stub,
)
from tests.policy.helpers import read_stream

pytestmark = pytest.mark.vllm
PROMPT = [20, 21, 22, 23, 24]


@pytest.fixture
def policy(policy_merged):
    return policy_merged


_set_active = set_active


async def test_merged_outputs_equal_hf_peft_and_rollback_restores(policy, tiny_adapters):
    info = await stub(policy.channel).GetInfo(policy_pb2.PolicyServiceGetInfoRequest())
    assert info.adapter_mode == policy_pb2.ADAPTER_MODE_MERGED
    base_ref = hf_greedy(policy.model_dir, None, PROMPT, 10)
    assert (await generate_greedy(policy, 10)) == (base_ref, None)

    await push_adapter(policy.channel, tiny_adapters[0], "m", 1, "tiny", token=ADMIN)
    tokens, served = await generate_greedy(policy, 10)
    assert served == ("m", 1)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, 10)

    await push_adapter(policy.channel, tiny_adapters[1], "m", 2, "tiny", token=ADMIN)
    tokens, served = await generate_greedy(policy, 10)
    assert served == ("m", 2)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[1], PROMPT, 10)

    # Pinning the active version is fine; anything else is a clear FAILED_PRECONDITION.
    assert (await generate_greedy(policy, 10, pinned("m", 2)))[1] == ("m", 2)
    for selector in (base(), pinned("m", 1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate_greedy(policy, 4, selector)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "merged adapter mode" in err.value.details()

    await _set_active(policy, "m", 1)  # rollback: v2's merge is undone, v1's applied
    tokens, served = await generate_greedy(policy, 10)
    assert served == ("m", 1)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, 10)

    await _set_active(policy, None)  # back to the exact base weights
    assert (await generate_greedy(policy, 10)) == (base_ref, None)


async def test_merged_hot_swap_under_load(policy, tiny_adapters):
    await _set_active(policy, None)
    _, switched = await run_hot_swap(policy, tiny_adapters, "mswap", follows_switches=True)
    # 4 clients send back to back, so switches land on running requests, which go on with the
    # new weights instead of holding the switch back (run_hot_swap checks their tokens).
    assert switched >= 1


async def test_merging_every_linear_layer_then_fewer_restores_the_rest(policy, tmp_path):
    """The in-place path rebuilds fused layers (q/k/v, gate/up) from their shards; modules the
    previous version changed and the next one doesn't get their base weights back."""
    wide = make_adapter(policy.model_dir, tmp_path / "wide", seed=7, targets=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    narrow = make_adapter(policy.model_dir, tmp_path / "narrow", seed=8, targets=("v_proj",))
    await push_adapter(policy.channel, wide, "wide", 1, "tiny", token=ADMIN)
    assert await generate_greedy(policy, 10) == (
        hf_greedy(policy.model_dir, wide, PROMPT, 10), ("wide", 1))
    await push_adapter(policy.channel, narrow, "wide", 2, "tiny", token=ADMIN)
    assert await generate_greedy(policy, 10) == (
        hf_greedy(policy.model_dir, narrow, PROMPT, 10), ("wide", 2))

    # Layers the in-place path doesn't know (quantized, tensor parallel) go through vLLM's
    # reload_weights instead: same weights. Driven directly here, on the idle engine.
    engine = policy.server.app.engine
    for adapter in (wide, narrow):
        await engine.llm.collective_rpc(cloudpickle.dumps(reload_merged), kwargs={
            "base_dir": str(policy.model_dir), "adapter_dir": str(adapter), "in_place": False})
        await engine.llm.reset_prefix_cache()
        assert (await generate_greedy(policy, 10))[0] == hf_greedy(
            policy.model_dir, adapter, PROMPT, 10)
    await _set_active(policy, None)



async def test_a_rewrite_that_fails_leaves_the_engine_serving_the_weights_it_had(
        policy, tiny_adapters, tmp_path):
    """The switch sends pause, rewrite, reset and resume to the engine back to back: when the
    rewrite fails, the resume still runs, so requests go on, on the old weights."""
    await push_adapter(policy.channel, tiny_adapters[0], "fail", 1, "tiny", token=ADMIN)
    expected = hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, 10)
    started = asyncio.Event()
    running = asyncio.create_task(_stream(policy, 24, None, started))
    await started.wait()
    with pytest.raises(Exception, match="adapter_config.json"):
        await policy.server.app.engine.load_merged(tmp_path / "no-such-adapter")
    tokens, served, _, _ = await running  # not left paused
    assert served == ("fail", 1)
    assert tokens[:10] == expected
    assert await generate_greedy(policy, 10) == (expected, ("fail", 1))
    await _set_active(policy, None)

async def _stream(policy, n_tokens: int, selector, started: asyncio.Event):
    req = policy_pb2.GenerateStreamRequest(prompt=ids_prompt(PROMPT), params=greedy(n_tokens))
    if selector is not None:
        req.adapter.CopyFrom(selector)
    return *await read_stream(policy.channel, req, started, timeout=120), time.monotonic()


async def test_a_switch_waits_for_pinned_requests_and_moves_unpinned_ones(policy, tiny_adapters):
    await push_adapter(policy.channel, tiny_adapters[0], "drain", 1, "tiny", token=ADMIN)
    all_v1, _ = await generate_greedy(policy, 300)
    follower_started, pinned_started = asyncio.Event(), asyncio.Event()
    follower = asyncio.create_task(_stream(policy, 300, None, follower_started))
    await follower_started.wait()
    holder = asyncio.create_task(_stream(policy, 16, pinned("drain", 1), pinned_started))
    await pinned_started.wait()
    await push_adapter(policy.channel, tiny_adapters[1], "drain", 2, "tiny", token=ADMIN)
    pushed_at = time.monotonic()

    tokens, served, finished, held_until = await holder
    # Pinned: finished on exactly the version it asked for, before the switch completed.
    assert (served, finished) == (("drain", 1), None)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, 16)
    assert held_until <= pushed_at
    tokens, served, finished, _ = await follower
    # Unpinned: went on with v2 and says so; its first tokens (at least as many as the pinned
    # request produced) are v1's, the rest differ from an all-v1 run.
    assert (served, finished) == (("drain", 1), ("drain", 2))
    assert len(tokens) == 300
    assert tokens[:16] == all_v1[:16]
    assert tokens != all_v1
    assert (await generate_greedy(policy, 4))[1] == ("drain", 2)
    await _set_active(policy, None)


async def test_requests_that_follow_the_active_version_go_in_while_a_switch_drains(
        policy, tiny_adapters):
    """A switch waits for requests pinned to the old version; new unpinned requests don't wait
    for it: they run at once on the old version (and would move with the weights, like running
    ones). New pinned requests wait the switch out."""
    await push_adapter(policy.channel, tiny_adapters[0], "open", 1, "tiny", token=ADMIN)
    pinned_started = asyncio.Event()
    holder = asyncio.create_task(_stream(policy, 64, pinned("open", 1), pinned_started))
    await pinned_started.wait()
    push = asyncio.create_task(
        push_adapter(policy.channel, tiny_adapters[1], "open", 2, "tiny", token=ADMIN))
    registry = policy.server.app.registry
    while not registry.switching and not push.done():
        await asyncio.sleep(0.002)
    assert registry.switching, "the push finished without waiting for the pinned request"
    pinned_new = asyncio.create_task(generate_greedy(policy, 3, pinned("open", 2)))

    tokens, served = await generate_greedy(policy, 3)
    assert not push.done() and not holder.done()  # served while the switch drained
    assert served == ("open", 1)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, 3)

    # A request pinned to the new version waited for the switch, then ran on it.
    tokens, served = await pinned_new
    assert push.done()
    assert served == ("open", 2)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[1], PROMPT, 3)
    assert (await holder)[1:3] == (("open", 1), None)
    await push
    await _set_active(policy, None)
