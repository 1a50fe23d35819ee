"""LoRA adapters on a real policy server (lora mode): push, equivalence with HF+peft, mixed
batches, rollback, kept versions, the admin token, every bad push, hot swap under load."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest

from rlhf.clients.push import push_adapter, push_requests
from rlhf.v1 import policy_pb2
from tests.fixtures.policy_helpers import (
    ADMIN,
    AUTH,
    base,
    generate_greedy,
    hf_greedy,
    pinned,
    run_hot_swap,
    set_active,
    stub,
    version_of,
)
from tests.policy.helpers import BAD_PUSHES, bad_pushes

pytestmark = pytest.mark.vllm

PROMPT = [20, 21, 22, 23, 24]
N_TOKENS = 10


@pytest.fixture
def policy(policy_lora):
    return policy_lora


async def _gen(policy, selector=None, prompt=PROMPT, n_tokens=N_TOKENS):
    return await generate_greedy(policy, n_tokens, selector, prompt)


async def _push(policy, folder, name, version, **kw):
    return await push_adapter(policy.channel, folder, name, version, "tiny", token=ADMIN, **kw)


_set_active = set_active


async def test_push_then_outputs_equal_hf_peft_and_base_equals_hf(policy, tiny_adapters):
    resp = await _push(policy, tiny_adapters[0], "eq", 1)
    assert resp.activated
    assert resp.adapter.adapter.name == "eq" and resp.adapter.adapter.version == 1
    assert resp.adapter.rank == 8 and resp.adapter.active
    data = (tiny_adapters[0] / "adapter_model.safetensors").read_bytes()
    assert resp.adapter.sha256 == hashlib.sha256(data).hexdigest()
    assert resp.load_seconds > 0

    tokens, served = await _gen(policy)
    assert served == ("eq", 1)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, N_TOKENS)
    base_tokens, served = await _gen(policy, base())
    assert served is None
    assert base_tokens == hf_greedy(policy.model_dir, None, PROMPT, N_TOKENS)
    assert tokens != base_tokens  # the adapter really changes the model



async def test_a_request_sent_while_a_push_loads_is_served_by_the_new_version(
        policy, tiny_adapters, monkeypatch):
    """A push pauses the engine while vLLM loads its adapter (no step could run then anyway).
    A request that follows the active version and arrives meanwhile waits for the new version
    and is in the engine before the engine resumes, so it runs in the first step after the
    load; one pinned to the old version goes into the engine at once, on the old version."""
    await _push(policy, tiny_adapters[0], "hold", 1)
    engine = policy.server.app.engine
    gate, adding = asyncio.Event(), asyncio.Event()
    real_add, real_resume = engine.add_adapter, engine.llm.resume_generation
    in_engine_at_resume = []

    async def held_add(handle):
        adding.set()
        await gate.wait()
        await real_add(handle)

    async def resume():
        in_engine_at_resume.append(engine.pending_requests())
        await real_resume()

    monkeypatch.setattr(engine, "add_adapter", held_add)
    monkeypatch.setattr(engine.llm, "resume_generation", resume)
    # The cap on waiting for the held request is a time; a slow machine must not trip it here
    # (test_registry.py tests the cap).
    monkeypatch.setattr("services.policy.adapters.lora.HOLD_SEND_SECONDS", 30.0)
    push = asyncio.create_task(_push(policy, tiny_adapters[1], "hold", 2))
    await adding.wait()
    assert await engine.llm.is_paused()
    follower = asyncio.create_task(_gen(policy))
    on_v1 = asyncio.create_task(_gen(policy, pinned("hold", 1)))
    await asyncio.sleep(0.3)
    assert engine.pending_requests() == 1  # the pinned one, waiting for the engine
    gate.set()
    assert (await push).activated
    assert in_engine_at_resume == [2]
    assert not await engine.llm.is_paused()
    assert await follower == (
        hf_greedy(policy.model_dir, tiny_adapters[1], PROMPT, N_TOKENS), ("hold", 2))
    assert await on_v1 == (
        hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, N_TOKENS), ("hold", 1))


async def test_mixed_batch_gives_each_request_its_own_weights(policy, tiny_adapters):
    await _push(policy, tiny_adapters[1], "mix", 1)
    await _push(policy, tiny_adapters[2], "mix", 2)
    want = {
        None: hf_greedy(policy.model_dir, None, PROMPT, N_TOKENS),
        ("mix", 1): hf_greedy(policy.model_dir, tiny_adapters[1], PROMPT, N_TOKENS),
        ("mix", 2): hf_greedy(policy.model_dir, tiny_adapters[2], PROMPT, N_TOKENS),
        ("eq", 1): hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, N_TOKENS),
    }
    assert len({tuple(v) for v in want.values()}) == 4
    selectors = [base(), None, pinned("mix", 1), pinned("eq", 1)] * 3
    results = await asyncio.gather(*(_gen(policy, sel) for sel in selectors))
    for tokens, served in results:
        assert tokens == want[served], served
    assert {served for _, served in results} == set(want)


async def test_the_engine_runs_the_grouped_cpu_lora_ops(policy):
    """The equivalence tests in this file run through services/policy/vllm_backend/cpu_lora.py:
    the engine process swapped them in at start (cpu_lora_ops = grouped, the default), and counts
    slot writes (so the hot-swap tests check that a reused slot is rebuilt)."""
    import cloudpickle

    from services.policy.vllm_backend import cpu_lora

    [names] = await policy.app.engine.llm.collective_rpc(cloudpickle.dumps(cpu_lora.installed))
    assert set(names) == {*cpu_lora._OPS, "PunicaWrapperCPU.update_metadata",
                          "PunicaWrapperCPU.add_lora_linear", "LoRAModelManager.activate_adapter"}


async def test_rollback_and_list(policy, tiny_adapters):
    await _push(policy, tiny_adapters[0], "rb", 1)
    await _push(policy, tiny_adapters[1], "rb", 2)
    listed = await stub(policy.channel).ListAdapters(policy_pb2.ListAdaptersRequest(name="rb"))
    assert [(a.adapter.version, a.active) for a in listed.adapters] == [(1, False), (2, True)]

    switched = await _set_active(policy, "rb", 1)
    assert version_of(switched.previous) == ("rb", 2)
    assert version_of(switched.active) == ("rb", 1)
    tokens, served = await _gen(policy)
    assert served == ("rb", 1)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, N_TOKENS)

    await _set_active(policy, None)
    tokens, served = await _gen(policy)
    assert served is None and tokens == hf_greedy(policy.model_dir, None, PROMPT, N_TOKENS)

    switched = await _set_active(policy, "rb", 0)  # 0 = newest kept
    assert version_of(switched.active) == ("rb", 2)
    info = await stub(policy.channel).GetInfo(policy_pb2.PolicyServiceGetInfoRequest())
    assert version_of(info.active) == ("rb", 2)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _set_active(policy, "rb", 9)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_only_the_last_versions_are_kept(policy, tiny_adapters):
    for version in range(1, 6):
        await _push(policy, tiny_adapters[version % 4], "keep", version)
    listed = await stub(policy.channel).ListAdapters(policy_pb2.ListAdaptersRequest(name="keep"))
    assert [a.adapter.version for a in listed.adapters] == [3, 4, 5]  # keep_versions=3
    assert listed.next_version == 6
    assert not (policy.data_dir / "policy" / "adapters" / "keep" / "v1").exists()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _gen(policy, pinned("keep", 1))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "kept versions: [3, 4, 5]" in err.value.details()
    tokens, served = await _gen(policy, pinned("keep", 3))
    assert served == ("keep", 3)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[3], PROMPT, N_TOKENS)

    # Re-pushing the same bytes under a kept version is idempotent...
    again = await _push(policy, tiny_adapters[1], "keep", 5)
    assert again.adapter.adapter.version == 5
    # ...other bytes under a kept version, or an old version number, are refused.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _push(policy, tiny_adapters[0], "keep", 5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _push(policy, tiny_adapters[0], "keep", 2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "next: 6" in err.value.details()
    # Version 0 means "next".
    nxt = await _push(policy, tiny_adapters[0], "keep", 0)
    assert nxt.adapter.adapter.version == 6


async def test_a_new_run_on_an_evicted_name_starts_above_its_old_versions(policy, tiny_adapters):
    """Versions evicted to make room for other names are no longer listed, but their numbers
    stay taken; ListAdapters says which one comes next and the trainer starts from it."""
    from services.trainer.clients import Services

    for version in (1, 2):
        await _push(policy, tiny_adapters[version], "evicted", version, activate=False)
    for filler in range(6):  # max_loaded_adapters=6: loading these unloads both "evicted"s
        await _push(policy, tiny_adapters[filler % 4], f"filler{filler}", 1, activate=False)
    listed = await stub(policy.channel).ListAdapters(
        policy_pb2.ListAdaptersRequest(name="evicted"))
    assert list(listed.adapters) == [] and listed.next_version == 3
    unnamed = await stub(policy.channel).ListAdapters(policy_pb2.ListAdaptersRequest())
    assert unnamed.next_version == 0  # only meaningful for one name

    services = Services([policy.addr], [policy.addr], "evicted", retry_max=5)
    assert await services.newest_version() == 2
    resp = await _push(policy, tiny_adapters[0], "evicted", await services.newest_version() + 1)
    assert resp.adapter.adapter.version == 3


async def test_admin_token_guards_model_changes(policy, tiny_adapters):
    s = stub(policy.channel)
    for metadata, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.PushAdapter(push_requests(tiny_adapters[0], "auth", 1, "tiny"),
                                metadata=metadata, timeout=30)
        assert err.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(base=True),
                                     metadata=metadata, timeout=30)
        assert err.value.code() == code
    listed = await s.ListAdapters(policy_pb2.ListAdaptersRequest(name="auth"))
    assert not listed.adapters
    # The one accepted form is the authorization header; an x-admin-token header is not read.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.PushAdapter(push_requests(tiny_adapters[0], "auth", 1, "tiny"),
                            metadata=(("x-admin-token", ADMIN),), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = await s.PushAdapter(push_requests(tiny_adapters[0], "auth", 1, "tiny"),
                               metadata=AUTH, timeout=30)
    assert resp.adapter.adapter.name == "auth"


@pytest.mark.parametrize("case", BAD_PUSHES)
async def test_bad_push_is_refused_and_the_active_version_keeps_serving(
    policy, tiny_adapters, tmp_path, case
):
    await _push(policy, tiny_adapters[3], "steady", 0)
    before = await _gen(policy)
    messages, code, text = bad_pushes(tiny_adapters[0], tmp_path)[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(policy.channel).PushAdapter(iter(messages), metadata=AUTH, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details()
    assert await _gen(policy) == before  # same version, same output
    root = policy.data_dir / "policy" / "adapters"
    assert not (root / "bad").exists()
    assert list((root / ".incoming").iterdir()) == []
    assert not (policy.data_dir.parent / "escape").exists()


async def test_hot_swap_under_load(policy, tiny_adapters):
    """Clients keep sending while 12 versions are pushed: no call fails, and every response
    names a version that was active at some point during the call, with that version's output."""
    await _set_active(policy, None)
    await run_hot_swap(policy, tiny_adapters, "swap")
