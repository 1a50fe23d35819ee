"""Staged pushes on real policy servers: a staged version is kept, servable pinned and not active;
SetActiveAdapter commits it, DropAdapter and KeepAdapter settle it, and a replica drops one not
committed by its deadline (also across a restart). `PolicyClient.stage_and_commit` over two
replicas is all or nothing, and requests during the commit are each served wholly by one version.
FakeEngine servers, except the last test (vLLM, the shared session server)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
import pytest

from rlhf.clients import Backoff, GaveUp, PolicyClient
from rlhf.clients.push import push_adapter
from rlhf.formats import ADAPTER_WEIGHTS_FILE
from rlhf.v1 import policy_pb2
from tests.fixtures.policy_helpers import (
    ADMIN,
    AUTH,
    SWAP_PROMPT,
    greedy,
    ids_prompt,
    pinned,
    set_active,
    stub,
    version_of,
)
from tests.policy.conftest import start_fake_policy, stop_fake_policy


def _sha(folder) -> str:
    return hashlib.sha256((folder / ADAPTER_WEIGHTS_FILE).read_bytes()).hexdigest()


async def _stage(policy, folder, name, version, seconds=600):
    return await push_adapter(policy.channel, folder, name, version, "tiny", token=ADMIN,
                              activate=False, stage_seconds=seconds)


async def _listed(policy, name) -> dict[int, policy_pb2.AdapterInfo]:
    resp = await stub(policy.channel).ListAdapters(policy_pb2.ListAdaptersRequest(name=name))
    return {a.adapter.version: a for a in resp.adapters}


async def _generate(policy, selector=None) -> policy_pb2.PromptResult:
    req = policy_pb2.GenerateRequest(prompts=[ids_prompt(SWAP_PROMPT)], params=greedy(6))
    if selector is not None:
        req.adapter.CopyFrom(selector)
    return (await stub(policy.channel).Generate(req, timeout=60)).results[0]


async def _eventually(check, seconds: float = 30.0) -> None:
    """Waits until check() (async) is true; the deadline is only a guard against hanging."""
    end = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.05)


def _client(*policies) -> PolicyClient:
    return PolicyClient([p.addr for p in policies], backoff=Backoff(max_seconds=5))


async def test_staged_version_serves_pinned_only_until_committed(fake_policy, tiny_adapters):
    await push_adapter(fake_policy.channel, tiny_adapters[0], "st", 1, "tiny", token=ADMIN)
    response = await _stage(fake_policy, tiny_adapters[1], "st", 2)
    assert not response.activated and response.adapter.staged
    kept = await _listed(fake_policy, "st")
    assert kept[2].staged and not kept[2].active and kept[2].staged_until.seconds > time.time()
    assert not kept[1].staged and kept[1].active
    # Users still get v1; a pinned request (an evaluation, a canary) gets v2, with its digest.
    active = await _generate(fake_policy)
    assert version_of(active.served_by) == ("st", 1)
    assert active.served_by.sha256 == _sha(tiny_adapters[0])
    staged = await _generate(fake_policy, pinned("st", 2))
    assert version_of(staged.served_by) == ("st", 2)
    assert staged.served_by.sha256 == _sha(tiny_adapters[1])
    # Activation commits it: no longer staged, no deadline.
    await set_active(fake_policy, "st", 2)
    kept = await _listed(fake_policy, "st")
    assert kept[2].active and not kept[2].staged and not kept[2].HasField("staged_until")
    assert (await _generate(fake_policy)).served_by.sha256 == _sha(tiny_adapters[1])


async def test_staged_version_not_committed_in_time_is_dropped(fake_policy, tiny_adapters):
    await _stage(fake_policy, tiny_adapters[0], "late", 1, seconds=1)
    assert 1 in await _listed(fake_policy, "late")

    async def gone():
        return not await _listed(fake_policy, "late")

    await _eventually(gone)
    assert fake_policy.engine.removed == ["late@v1"]
    assert not (fake_policy.data_dir / "policy" / "adapters" / "late" / "v1").exists()
    # Its number is not reused: the next push must carry v2.
    resp = await stub(fake_policy.channel).ListAdapters(policy_pb2.ListAdaptersRequest(
        name="late"))
    assert resp.next_version == 2
    metrics = fake_policy.app.stats.staged_dropped.labels("timeout")._value.get()
    assert metrics >= 1


async def test_drop_and_keep_settle_a_staged_version(fake_policy, tiny_adapters):
    await _stage(fake_policy, tiny_adapters[0], "dk", 1)
    await _stage(fake_policy, tiny_adapters[1], "dk", 2, seconds=1)
    s = stub(fake_policy.channel)
    ref = policy_pb2.AdapterRef(name="dk", version=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # an admin call
        await s.DropAdapter(policy_pb2.DropAdapterRequest(adapter=ref))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await s.DropAdapter(policy_pb2.DropAdapterRequest(adapter=ref), metadata=AUTH)).dropped
    assert not (await s.DropAdapter(policy_pb2.DropAdapterRequest(adapter=ref),
                                    metadata=AUTH)).dropped
    # Kept: no longer staged, so its 1 s deadline no longer drops it.
    kept = await s.KeepAdapter(policy_pb2.KeepAdapterRequest(
        adapter=policy_pb2.AdapterRef(name="dk", version=2)), metadata=AUTH)
    assert not kept.adapter.staged
    await asyncio.sleep(1.5)
    assert list(await _listed(fake_policy, "dk")) == [2]
    # The active version cannot be dropped.
    await set_active(fake_policy, "dk", 2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.DropAdapter(policy_pb2.DropAdapterRequest(
            adapter=policy_pb2.AdapterRef(name="dk", version=2)), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is active" in err.value.details()


async def test_stage_deadline_holds_across_a_restart(tiny_model_dir, tmp_path, tiny_adapters):
    data = tmp_path / "data"
    policy = await start_fake_policy(tiny_model_dir, data)
    try:
        await _stage(policy, tiny_adapters[0], "rs", 1, seconds=600)
        await _stage(policy, tiny_adapters[1], "rs", 2, seconds=2)
    finally:
        await stop_fake_policy(policy)
    await asyncio.sleep(2.5)  # v2's deadline passes while the replica is down
    policy = await start_fake_policy(tiny_model_dir, data)
    try:
        async def v2_gone():
            return list(await _listed(policy, "rs")) == [1]

        await _eventually(v2_gone)
        assert (await _listed(policy, "rs"))[1].staged  # still staged, deadline kept
    finally:
        await stop_fake_policy(policy)


async def test_stage_and_commit_activates_on_every_replica(tiny_model_dir, tmp_path,
                                                           tiny_adapters):
    a = await start_fake_policy(tiny_model_dir, tmp_path / "a")
    b = await start_fake_policy(tiny_model_dir, tmp_path / "b")
    client = _client(a, b)
    try:
        decided = []

        async def decide(result):
            # Between stage and activate: staged everywhere, active nowhere.
            for p in (a, b):
                info = (await _listed(p, "sc"))[1]
                decided.append((info.staged, info.active))
            return True

        result = await client.stage_and_commit(tiny_adapters[0], "sc", 1, "tiny", token=ADMIN,
                                               decide=decide)
        assert decided == [(True, False), (True, False)]
        assert sorted(result.activated) == sorted([a.addr, b.addr]) and not result.missed
        assert result.sha256 == _sha(tiny_adapters[0])
        for p in (a, b):
            info = (await _listed(p, "sc"))[1]
            assert info.active and not info.staged
        # decide False: nothing activated, the staged copies are the caller's to keep or drop.
        result = await client.stage_and_commit(tiny_adapters[1], "sc", 2, "tiny", token=ADMIN,
                                               decide=lambda r: asyncio.sleep(0, False))
        assert result.activated == []
        assert await client.drop("sc", 2, result.confirmed, token=ADMIN) == result.confirmed
        for p in (a, b):
            assert list(await _listed(p, "sc")) == [1]
    finally:
        await client.close()
        await stop_fake_policy(a)
        await stop_fake_policy(b)


async def test_a_replica_that_fails_staging_leaves_none_on_the_new_version(
        tiny_model_dir, tmp_path, tiny_adapters):
    a = await start_fake_policy(tiny_model_dir, tmp_path / "a")
    small = await start_fake_policy(tiny_model_dir, tmp_path / "b", max_adapter_bytes=1024)
    client = _client(a, small)
    try:
        await push_adapter(a.channel, tiny_adapters[0], "all", 1, "tiny", token=ADMIN)
        with pytest.raises(GaveUp) as err:
            await client.stage_and_commit(tiny_adapters[1], "all", 2, "tiny", token=ADMIN,
                                          attempts=1)
        assert "no replica activates it" in str(err.value)
        assert "max_adapter_bytes" in str(err.value) or "1024" in str(err.value)
        kept = await _listed(a, "all")
        assert list(kept) == [1] and kept[1].active  # the staged copy went; v1 still serves
        assert version_of((await _generate(a)).served_by) == ("all", 1)
        assert await _listed(small, "all") == {}
    finally:
        await client.close()
        await stop_fake_policy(a)
        await stop_fake_policy(small)


async def test_a_replica_that_misses_the_activation_is_reported(tiny_model_dir, tmp_path,
                                                                tiny_adapters):
    a = await start_fake_policy(tiny_model_dir, tmp_path / "a")
    b = await start_fake_policy(tiny_model_dir, tmp_path / "b")
    client = _client(a, b)
    try:
        async def lose_it_on_b(result):
            # b loses the staged copy between stage and commit (as a deadline or restart would).
            await stub(b.channel).DropAdapter(policy_pb2.DropAdapterRequest(
                adapter=policy_pb2.AdapterRef(name="miss", version=1)), metadata=AUTH)
            return True

        result = await client.stage_and_commit(tiny_adapters[0], "miss", 1, "tiny",
                                               token=ADMIN, decide=lose_it_on_b)
        assert result.activated == [a.addr]
        assert list(result.missed) == [b.addr] and "NOT_FOUND" in result.missed[b.addr]
    finally:
        await client.close()
        await stop_fake_policy(a)
        await stop_fake_policy(b)


async def test_requests_during_a_commit_are_each_served_by_one_version(
        tiny_model_dir, tmp_path, tiny_adapters):
    from services.policy.fake_engine import FakeEngine

    replicas = [await start_fake_policy(tiny_model_dir, tmp_path / n,
                                        engine=FakeEngine(vocab_size=512, token_delay=0.002))
                for n in ("a", "b")]
    client = _client(*replicas)
    try:
        await client.stage_and_commit(tiny_adapters[0], "mix", 1, "tiny", token=ADMIN)
        seen: list[tuple] = []
        done = asyncio.Event()

        async def user(policy):
            while not done.is_set():
                result = await _generate(policy)
                seen.append((policy, version_of(result.served_by), result.served_by.sha256,
                             list(result.completions[0].token_ids)))

        def served(version):
            async def check():
                return sum(v == version for _, (_, v), _, _ in seen) >= 2
            return check

        users = [asyncio.create_task(user(p)) for p in replicas for _ in range(3)]
        await _eventually(served(1))
        await client.stage_and_commit(tiny_adapters[1], "mix", 2, "tiny", token=ADMIN)
        await _eventually(served(2))
        done.set()
        await asyncio.gather(*users)
        digests = {1: _sha(tiny_adapters[0]), 2: _sha(tiny_adapters[1])}
        versions = {v for _, (_, v), _, _ in seen}
        assert versions == {1, 2}
        for policy, (_, version), sha, tokens in seen:
            assert sha == digests[version]
            expected = [policy.engine.token(SWAP_PROMPT, 0, i, None, f"mix@v{version}")
                        for i in range(6)]
            assert tokens == expected  # every token from the version it names
    finally:
        await client.close()
        for p in replicas:
            await stop_fake_policy(p)


@pytest.mark.vllm
async def test_staged_then_activated_push_on_vllm(policy_lora, tiny_adapters):
    """Concurrent greedy requests while a version is staged then activated: each response names
    one version (and its digest) and its tokens are that version's greedy tokens."""
    client = PolicyClient([policy_lora.addr], backoff=Backoff(max_seconds=30))
    try:
        await client.stage_and_commit(tiny_adapters[2], "vstage", 1, "tiny", token=ADMIN)
        await _stage(policy_lora, tiny_adapters[3], "vstage", 2)
        greedy_of = {v: list((await _generate(policy_lora, pinned("vstage", v)))
                             .completions[0].token_ids) for v in (1, 2)}
        assert greedy_of[1] != greedy_of[2]
        seen = []
        done = asyncio.Event()

        async def user():
            while not done.is_set():
                result = await _generate(policy_lora)
                seen.append((version_of(result.served_by), result.served_by.sha256,
                             list(result.completions[0].token_ids)))

        def served(version):
            async def check():
                return any(v == version for (_, v), _, _ in seen)
            return check

        users = [asyncio.create_task(user()) for _ in range(4)]
        await _eventually(served(1), 120)
        await set_active(policy_lora, "vstage", 2)  # the commit of the staged v2
        await _eventually(served(2), 120)
        done.set()
        await asyncio.gather(*users)
        digests = {1: _sha(tiny_adapters[2]), 2: _sha(tiny_adapters[3])}
        assert {v for (_, v), _, _ in seen} == {1, 2}
        for (_, version), sha, tokens in seen:
            assert sha == digests[version]
            assert tokens == greedy_of[version]
    finally:
        await set_active(policy_lora)  # the session server serves the base model again
        await client.close()
