"""PushAdapter's checks and clean-up on a real policy server (FakeEngine): every bad push is
refused with its reason, leaves nothing on disk and the active version serving; a version the
engine refuses is not kept; kept versions and the active one survive a restart; merged-mode
switches keep pinned requests on their version. test_adapters.py and test_merged.py run the
same on vLLM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from rlhf.clients.push import push_adapter, push_requests
from rlhf.v1 import policy_pb2
from tests.fixtures.policy_helpers import (
    ADMIN,
    AUTH,
    base,
    generate_greedy,
    greedy,
    ids_prompt,
    pinned,
    set_active,
    stub,
)
from tests.policy.conftest import start_fake_policy, stop_fake_policy
from tests.policy.helpers import BAD_PUSHES, bad_pushes, read_stream


async def _push(policy, folder, name, version, **kw):
    return await push_adapter(policy.channel, folder, name, version, "tiny", token=ADMIN, **kw)


async def _listed(policy, name):
    resp = await stub(policy.channel).ListAdapters(policy_pb2.ListAdaptersRequest(name=name))
    return [(a.adapter.version, a.active) for a in resp.adapters], resp.next_version


@pytest.mark.parametrize("case", BAD_PUSHES)
async def test_bad_push_is_refused_and_the_active_version_keeps_serving(
    fake_policy, tiny_adapters, tmp_path, case
):
    await _push(fake_policy, tiny_adapters[3], "steady", 0)
    before = await generate_greedy(fake_policy, 6)
    assert before[1] == ("steady", 1)
    loaded = list(fake_policy.engine.added)
    messages, code, text = bad_pushes(tiny_adapters[0], tmp_path)[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(fake_policy.channel).PushAdapter(iter(messages), metadata=AUTH, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details()
    assert await generate_greedy(fake_policy, 6) == before  # same version, same output
    assert fake_policy.engine.added == loaded
    assert await _listed(fake_policy, "bad") == ([], 1)
    root = fake_policy.data_dir / "policy" / "adapters"
    assert not (root / "bad").exists()
    assert list((root / ".incoming").iterdir()) == []
    assert not (fake_policy.data_dir.parent / "escape").exists()


async def test_a_version_the_engine_refuses_is_not_kept(fake_policy, tiny_adapters):
    await _push(fake_policy, tiny_adapters[0], "p", 1)
    before = await generate_greedy(fake_policy, 6)
    fake_policy.engine.fail_next_load = "no free slot"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _push(fake_policy, tiny_adapters[1], "p", 2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused adapter p@v2: no free slot" in err.value.details()
    assert await generate_greedy(fake_policy, 6) == before
    assert await _listed(fake_policy, "p") == ([(1, True)], 2)  # v2's number is still free
    root = fake_policy.data_dir / "policy" / "adapters"
    assert not (root / "p" / "v2").exists()
    assert list((root / ".incoming").iterdir()) == []
    again = await _push(fake_policy, tiny_adapters[1], "p", 2)
    assert again.activated and (await generate_greedy(fake_policy, 6))[1] == ("p", 2)


async def test_a_version_is_served_with_its_own_handle_and_old_ones_are_unloaded(
        fake_policy, tiny_adapters):
    engine = fake_policy.engine
    for version in range(1, 6):
        await _push(fake_policy, tiny_adapters[version % 4], "keep", version)
    assert engine.added == [f"keep@v{v}" for v in range(1, 6)]
    assert engine.removed == ["keep@v1", "keep@v2"]  # keep_versions=3
    assert engine.loaded() == {"keep@v3", "keep@v4", "keep@v5"}
    tokens, served = await generate_greedy(fake_policy, 4, pinned("keep", 4))
    assert served == ("keep", 4)
    assert tokens == [engine.token([20, 21, 22, 23, 24], 0, k, None, "keep@v4") for k in range(4)]


async def test_adapters_and_the_active_version_survive_a_restart(tiny_model_dir, tiny_adapters,
                                                                  tmp_path):
    data_dir = tmp_path / "data"
    first = await start_fake_policy(tiny_model_dir, data_dir)
    try:
        await _push(first, tiny_adapters[0], "persist", 1)
        await _push(first, tiny_adapters[1], "persist", 2)
        await set_active(first, "persist", 1)
    finally:
        await stop_fake_policy(first)
    # An upload the first life did not finish is cleared at start-up.
    (data_dir / "policy" / "adapters" / ".incoming" / "half").mkdir(parents=True)
    second = await start_fake_policy(tiny_model_dir, data_dir)
    try:
        assert await _listed(second, "persist") == ([(1, True), (2, False)], 3)
        assert sorted(second.engine.added) == ["persist@v1", "persist@v2"]
        assert (await generate_greedy(second, 4))[1] == ("persist", 1)
        assert not (data_dir / "policy" / "adapters" / ".incoming" / "half").exists()
    finally:
        await stop_fake_policy(second)


async def test_merged_mode_serves_only_the_active_version(fake_merged, tiny_adapters):
    await _push(fake_merged, tiny_adapters[0], "m", 1)
    assert fake_merged.engine.merged[-1].parts[-2:] == ("m", "v1")
    assert (await generate_greedy(fake_merged, 4, pinned("m", 1)))[1] == ("m", 1)
    for selector in (base(), pinned("m", 2)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate_greedy(fake_merged, 4, selector)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "merged adapter mode" in err.value.details()
    await set_active(fake_merged, None)
    assert fake_merged.engine.merged[-1] is None


async def test_a_merge_that_fails_keeps_the_version_out_and_the_old_one_serving(
        fake_merged, tiny_adapters):
    await _push(fake_merged, tiny_adapters[0], "m", 1)
    before = await generate_greedy(fake_merged, 4)
    fake_merged.engine.fail_next_load = "out of memory"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _push(fake_merged, tiny_adapters[1], "m", 2)
    assert "could not merge" in err.value.details()
    assert await generate_greedy(fake_merged, 4) == before
    assert await _listed(fake_merged, "m") == ([(1, True)], 2)


async def _stream(policy, n_tokens, selector, started: asyncio.Event):
    req = policy_pb2.GenerateStreamRequest(prompt=ids_prompt([7, 8]), params=greedy(n_tokens))
    if selector is not None:
        req.adapter.CopyFrom(selector)
    return await read_stream(policy.channel, req, started, timeout=60)


async def test_a_merged_switch_waits_for_pinned_requests_and_moves_unpinned_ones(
        fake_merged, tiny_adapters):
    await _push(fake_merged, tiny_adapters[0], "drain", 1)
    fake_merged.engine.token_delay = 0.01
    follower_started, pinned_started = asyncio.Event(), asyncio.Event()
    follower = asyncio.create_task(_stream(fake_merged, 80, None, follower_started))
    holder = asyncio.create_task(_stream(fake_merged, 20, pinned("drain", 1), pinned_started))
    await asyncio.gather(follower_started.wait(), pinned_started.wait())
    await _push(fake_merged, tiny_adapters[1], "drain", 2)
    engine = fake_merged.engine
    v1, v2 = (f"merged:{path}" for path in engine.merged)

    def tokens_of(weights, positions):
        return [engine.token([7, 8], 0, k, None, weights) for k in positions]

    # Pinned: every token from the version it asked for (the switch waited for it).
    tokens, served, finished = await holder
    assert (served, finished) == (("drain", 1), None)
    assert tokens == tokens_of(v1, range(20))
    # Unpinned: went on with v2 and says so; v1's tokens up to the switch, v2's after it.
    tokens, served, finished = await follower
    assert (served, finished) == (("drain", 1), ("drain", 2))
    switch = next(k for k in range(80) if tokens[k] != tokens_of(v1, [k])[0])
    assert 20 <= switch < 80
    assert tokens[switch:] == tokens_of(v2, range(switch, 80))


async def test_a_push_cancelled_midway_leaves_nothing_a_restart_loads(tiny_model_dir,
                                                                       tiny_adapters, tmp_path):
    data_dir = tmp_path / "data"
    first = await start_fake_policy(tiny_model_dir, data_dir)
    try:
        messages = list(push_requests(tiny_adapters[0], "half", 1, "tiny", chunk_bytes=4096))
        sent = asyncio.Event()

        async def half_then_wait():
            for message in messages[: len(messages) // 2]:
                yield message
            sent.set()
            await asyncio.Event().wait()

        call = stub(first.channel).PushAdapter(half_then_wait(), metadata=AUTH, timeout=60)
        await sent.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        await stop_fake_policy(first)
    second = await start_fake_policy(tiny_model_dir, data_dir)
    try:
        assert await _listed(second, "half") == ([], 1)
        assert second.engine.added == []
        root = data_dir / "policy" / "adapters"
        assert not (root / "half").exists()
        assert not (root / ".incoming").exists() or list((root / ".incoming").iterdir()) == []
    finally:
        await stop_fake_policy(second)


def test_every_torch_load_in_the_policy_reads_tensors_only():
    root = Path(__file__).resolve().parents[2] / "services" / "policy"
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{number}: {line.strip()}"
