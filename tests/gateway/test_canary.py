"""The gateway's canary (issue 21 point 5): the decision rule on hand-made samples, the traffic
split's bound, and real services end to end: two policy gRPC replicas over a FakeEngine whose
tokens depend on the adapter version (a bad version draws low token ids, a good one high ids), a
reward server scoring the mean token id (python scorer below) and a real gateway (uvicorn). A
staged bad version is rolled back having served at most its fraction of `policy` traffic; a
staged good one is promoted on both replicas."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.canary import CANDIDATE, INCUMBENT, Canary, Trial
from gateway.canary_rule import ArmStats, Rule, judge, t_sf, welch_noninferiority
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from rlhf.clients import PolicyClient
from rlhf.clients.push import admin_metadata, push_requests
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.policy.app import PolicyApp
from services.policy.config import PolicyConfig
from services.policy.fake_engine import FakeEngine
from services.trainer.ppo.canary_watch import CanaryWatch
from tests.fixtures.policy_helpers import ADMIN, make_adapter
from tests.fixtures.reward_helpers import start_reward
from tests.gateway.helpers import GatewayThread

VOCAB = 512
OWNER = "canary-admin-key-0001"
USER = "canary-user-key-00002"
BAD, GOOD = 2, 3  # adapter versions the engine skews


def token_mean(prompts, completions, **kwargs):
    """Reward: the mean token id of a FakeEngine completion (" t12 t400 ..."), in [0, 1)."""
    out = []
    for c in completions:
        ids = [int(t[1:]) for t in c.split() if t.startswith("t") and t[1:].isdigit()]
        out.append(sum(ids) / len(ids) / VOCAB if ids else 0.0)
    return out


class SkewedEngine(FakeEngine):
    """FakeEngine whose adapter version BAD draws ids in [0, 32) and GOOD in [VOCAB/2, VOCAB):
    on the token_mean reward the first is far worse than the active version, the second better."""

    def token(self, prompt_ids, index, position, seed, served) -> int:
        tok = super().token(prompt_ids, index, position, seed, served)
        if served.endswith(f"@v{BAD}"):
            return tok % 32
        if served.endswith(f"@v{GOOD}"):
            return VOCAB // 2 + tok % (VOCAB // 2)
        return tok


# ---- the rule, on hand-made samples -----------------------------------------------------------


def test_t_distribution_matches_the_table():
    """The one-sided tail of Student's t at textbook quantiles (no scipy here)."""
    for t, df, tail in ((2.228, 10, 0.025), (1.812, 10, 0.05), (12.706, 1, 0.025),
                        (2.576, 1e7, 0.005), (2.042, 30, 0.025)):
        assert t_sf(t, df) == pytest.approx(tail, abs=2e-4)
        assert t_sf(-t, df) == pytest.approx(1 - tail, abs=2e-4)
    assert t_sf(0.0, 7) == pytest.approx(0.5)


def test_welch_statistic_on_a_worked_example():
    """Welch's t and degrees of freedom computed by hand for two small samples."""
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    t, df, _ = welch_noninferiority(a, b, margin=0.0)
    # means 2.5 and 4; variances/n 1.6667/4 and 4/3; se^2 = 1.75
    assert t == pytest.approx(-1.5 / math.sqrt(1.75))
    assert df == pytest.approx(1.75 ** 2 / ((1.6667 / 4) ** 2 / 3 + (4 / 3) ** 2 / 2), rel=1e-3)


def _arm(rewards, requests=None, errors=0, latency=0.1) -> ArmStats:
    n = requests if requests is not None else len(rewards)
    return ArmStats(requests=n, errors=errors, latency_sum=latency * n, rewards=list(rewards))


def _normal(mean: float, sd: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


def test_rule_promotes_a_version_as_good_and_rolls_back_a_worse_one():
    rule = Rule(min_requests=200, margin_sd=0.2, alpha=0.05)
    incumbent = _arm(_normal(0.5, 0.1, 2000, 1))
    same = judge(_arm(_normal(0.5, 0.1, 400, 2)), incumbent, rule)
    assert same.promote, same.reasons
    better = judge(_arm(_normal(0.6, 0.1, 400, 3)), incumbent, rule)
    assert better.promote
    # Worse by the margin (0.2 sd) or more: never shown non-inferior.
    worse = judge(_arm(_normal(0.47, 0.1, 400, 4)), incumbent, rule)
    assert not worse.promote
    assert "reward not shown non-inferior" in worse.reasons[0]
    assert worse.figures["reward_test"]["p"] >= 0.05
    assert worse.figures["candidate"]["scored"] == 400


def test_rule_rolls_back_on_too_few_answers_errors_or_latency():
    rule = Rule(min_requests=10, max_error_increase=0.01, max_latency_ratio=1.5)
    incumbent = _arm(_normal(0.5, 0.1, 100, 5))
    few = judge(_arm([0.9]), incumbent, rule)
    assert not few.promote and "too few scored answers" in few.reasons[0]
    erring = judge(_arm(_normal(0.5, 0.1, 100, 6), requests=100, errors=5), incumbent, rule)
    assert not erring.promote and any("error rate" in r for r in erring.reasons)
    slow = judge(_arm(_normal(0.5, 0.1, 100, 7), latency=0.2), incumbent, rule)
    assert not slow.promote and any("latency" in r for r in slow.reasons)
    # Constant rewards (no spread): equal means are not worse.
    assert judge(_arm([1.0] * 20), _arm([1.0] * 20), rule).promote
    assert not judge(_arm([0.0] * 20), _arm([1.0] * 20), rule).promote


class _Config:
    canary_fraction = 0.1
    canary_min_requests = 10
    canary_margin_sd = 0.2
    canary_alpha = 0.05
    canary_max_error_increase = 0.01
    canary_max_latency_ratio = 1.5
    canary_max_seconds = 60
    adapter_name = "policy"


def test_split_never_gives_the_candidate_more_than_its_fraction():
    """Routing is deterministic: after any number of `policy` requests the candidate has had at
    most fraction x requests; pinned and base requests are never rerouted."""
    canary = Canary(_Config(), None, GatewayMetrics.create(), None)
    canary.trial = Trial("policy", 7, "policy@v6", 0.0, 60.0)
    active = policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_ACTIVE)
    to_candidate = 0
    for k in range(1, 1001):
        trial, arm = canary._route(active)
        assert arm in (CANDIDATE, INCUMBENT)
        to_candidate += arm == CANDIDATE
        assert to_candidate <= 0.1 * k
    assert to_candidate == 100
    pinned = policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_PINNED,
                                        pinned=policy_pb2.AdapterRef(name="policy", version=6))
    base = policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_BASE)
    assert canary._route(pinned) == (None, "") and canary._route(base) == (None, "")


# ---- real services ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def canary_replicas(tiny_model_dir, tmp_path_factory):
    """Two policy replicas (SkewedEngine) with v1 active, and the token_mean reward."""
    servers = []
    for k in range(2):
        cfg = PolicyConfig.load(
            grpc_port=0, metrics_port=0, model=tiny_model_dir,
            data_dir=tmp_path_factory.mktemp(f"canary-policy{k}"), max_model_len=512,
            adapter_mode="lora", admin_token=ADMIN, default_max_tokens=8, drain_grace_seconds=1)
        servers.append(await GrpcServer(cfg, PolicyApp(cfg, engine=SkewedEngine(
            vocab_size=VOCAB, max_model_len=512))).start())
    reward = await start_reward([f"python:{__name__}:token_mean"])
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("canary-adapter"), seed=5)
    addrs = [f"127.0.0.1:{s.port}" for s in servers]
    for addr in addrs:
        await _push(addr, adapter, 1, stage_seconds=0)
    yield addrs, f"127.0.0.1:{reward.server.port}", adapter
    await reward.close()
    for s in servers:
        await s.shutdown()


async def _push(addr: str, adapter: Path, version: int, stage_seconds: int) -> None:
    """Pushes `version`: activated (stage_seconds 0) or staged as the trainer's canary mode
    leaves it."""
    requests = list(push_requests(adapter, "policy", version, "tiny", activate=False))
    requests[0].header.skip_activate = stage_seconds > 0
    requests[0].header.stage_seconds = stage_seconds
    async with grpc.aio.insecure_channel(addr) as channel:
        await policy_pb2_grpc.PolicyServiceStub(channel).PushAdapter(
            iter(requests), metadata=admin_metadata(ADMIN), timeout=60)


async def _listing(addr: str) -> policy_pb2.ListAdaptersResponse:
    async with grpc.aio.insecure_channel(addr) as channel:
        return await policy_pb2_grpc.PolicyServiceStub(channel).ListAdapters(
            policy_pb2.ListAdaptersRequest(name="policy"), timeout=10)


async def _listings(addrs: list[str]) -> list[policy_pb2.ListAdaptersResponse]:
    return [await _listing(addr) for addr in addrs]


@pytest.fixture
def canary_gateway(canary_replicas, tmp_path):
    addrs, reward_addr, _ = canary_replicas
    gw = GatewayThread(GatewayConfig.load(
        http_port=0, policy_addr=addrs, reward_addr=[reward_addr], data_dir=tmp_path,
        rate_limit_per_minute=0, upstream_timeout_seconds=60, api_keys=[USER],
        admin_api_keys=[OWNER], policy_admin_token=ADMIN, canary_fraction=0.25,
        canary_min_requests=12, canary_max_seconds=300, canary_poll_seconds=0.2,
        canary_max_latency_ratio=100.0, canary_max_error_increase=0.0)).start()
    yield gw
    gw.stop()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def _status(c: httpx.AsyncClient) -> dict:
    r = await c.get("/v1/admin/canary", headers=_auth(OWNER))
    assert r.status_code == 200, r.text
    return r.json()


async def _until(c: httpx.AsyncClient, check, what: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await _status(c)
        if check(status):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {status}")


async def _one(c: httpx.AsyncClient, i: int, model: str = "policy") -> str:
    """One request of a rotating kind; returns the model id that answered it."""
    prompt = f"question number {i} about {i * 7 % 13}"
    kind = i % 3
    if kind == 0:
        r = await c.post("/v1/best-of-n", headers=_auth(USER), json={
            "model": model, "prompt": prompt, "n": 2, "max_tokens": 8})
    elif kind == 1:
        r = await c.post("/v1/completions", headers=_auth(USER), json={
            "model": model, "prompt": prompt, "max_tokens": 8})
    else:
        r = await c.post("/v1/chat/completions", headers=_auth(USER), json={
            "model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8})
    assert r.status_code == 200, r.text
    return r.json()["model"]


async def _drive(c: httpx.AsyncClient, start: int) -> list[str]:
    """`policy` requests, 4 at a time, until the trial has its verdict."""
    served, i = [], start
    while True:
        served += await asyncio.gather(*(_one(c, i + k) for k in range(4)))
        i += 4
        status = await _status(c)
        if status["trial"] is None or "decision" in status["trial"]:
            return served
        assert len(served) < 2000, status


async def test_canary_rolls_back_a_bad_version_and_promotes_a_good_one(canary_replicas,
                                                                      canary_gateway):
    """21.5: staged v2 (low reward) serves at most 25% of `policy` requests and is unstaged on
    both replicas, never activated, with the reason and figures recorded; pinned `policy@v1`
    requests are never rerouted; staged v3 (higher reward) is then promoted on both replicas."""
    addrs, _, adapter = canary_replicas
    async with httpx.AsyncClient(base_url=canary_gateway.url, timeout=60) as c:
        denied = await c.get("/v1/admin/canary", headers=_auth(USER))
        assert denied.status_code == 403 and denied.json()["error"]["message"]
        assert (await _status(c))["trial"] is None

        policy = PolicyClient(addrs, timeout=10.0)
        # What the learner runs in promotion canary mode, reading the gateway for the reason.
        watch = CanaryWatch(policy, "policy", canary_gateway.url, OWNER)
        for addr in addrs:
            await _push(addr, adapter, BAD, stage_seconds=600)
        watch.handed(BAD)
        await _until(c, lambda s: s["trial"] and s["trial"]["version"] == BAD, "the trial")
        assert await watch.poll() == []  # undecided
        pinned = await asyncio.gather(*(_one(c, i, model="policy@v1") for i in range(6)))
        assert set(pinned) == {"policy@v1"}
        served = await _drive(c, 0)
        status = await _until(c, lambda s: s["trial"] is None, "the rollback to apply")
        verdict = status["decisions"][-1]
        assert verdict["version"] == BAD and verdict["decision"] == "rolled_back"
        assert verdict["applied"] is True
        assert "reward not shown non-inferior" in verdict["reasons"][0]
        assert verdict["figures"]["candidate"]["mean_reward"] < \
            verdict["figures"]["incumbent"]["mean_reward"]
        bad = served.count(f"policy@v{BAD}")
        # The bound: the candidate answered at most its fraction of the `policy` requests.
        assert 12 <= bad <= 0.25 * len(served), (bad, len(served))
        assert set(served) <= {"policy@v1", f"policy@v{BAD}"}
        for addr in addrs:
            listing = await _listing(addr)
            assert listing.active.adapter.version == 1
            # Unstaged, not active: only a request naming policy@v2 (the learner's) gets it.
            assert [(a.staged, a.active) for a in listing.adapters
                    if a.adapter.version == BAD] == [(False, False)]
        told = await watch.poll()
        assert [(o.version, o.decision) for o in told] == [(BAD, "rolled_back")]
        assert "reward not shown non-inferior" in told[0].reason
        # After the verdict every `policy` request is served by the incumbent.
        assert set(await asyncio.gather(*(_one(c, i) for i in range(6)))) == {"policy@v1"}

        for addr in addrs:
            await _push(addr, adapter, GOOD, stage_seconds=600)
        watch.handed(GOOD)
        await _until(c, lambda s: s["trial"] and s["trial"]["version"] == GOOD, "the 2nd trial")
        await _drive(c, 1000)
        status = await _until(c, lambda s: s["trial"] is None, "the promotion to apply")
        verdict = status["decisions"][-1]
        assert verdict["version"] == GOOD and verdict["decision"] == "promoted", verdict
        assert verdict["figures"]["reward_test"]["p"] < 0.05
        for addr in addrs:
            listing = await _listing(addr)
            assert listing.active.adapter.version == GOOD
            assert not any(a.staged for a in listing.adapters)
        assert [(o.version, o.decision) for o in await watch.poll()] == [(GOOD, "promoted")]
        await policy.close()
        metrics = (await c.get("/metrics")).text
        assert 'rlhf_gateway_canary_decisions_total{decision="rolled_back"}' in metrics
        assert 'rlhf_gateway_canary_decisions_total{decision="promoted"}' in metrics
        assert "rlhf_gateway_canary_active 0.0" in metrics


async def _cli(*args: str):
    """`rlhf adapters ...` in a thread (it runs its own event loop; the replicas serve on this
    one meanwhile)."""
    from click.testing import CliRunner

    from rlhf.adapters_cli import adapters

    return await asyncio.to_thread(CliRunner().invoke, adapters, list(args))


async def test_adapters_cli_lists_promotes_and_rolls_back_on_every_replica(canary_replicas):
    """21.5 manual override: `rlhf adapters list|promote|rollback` acts on every replica, needs
    the admin token, and names the replicas that refused."""
    addrs, _, adapter = canary_replicas
    where = ["--policy-addr", ",".join(addrs)]
    token = ["--admin-token", ADMIN]
    for addr in addrs:
        await _push(addr, adapter, 20, stage_seconds=600)
        await _push(addr, adapter, 21, stage_seconds=600)
    listed = await _cli("list", "--json", *where)
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["replica"] for r in rows] == addrs
    assert all({"version": 21, "state": "staged"} == {k: a[k] for k in ("version", "state")}
               for r in rows for a in r["adapters"] if a["version"] == 21)

    refused = await _cli("promote", "20", *where)
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
    assert all(lst.active.adapter.version != 20 for lst in await _listings(addrs))

    promoted = await _cli("promote", "20", *where, *token)
    assert promoted.exit_code == 0, promoted.output
    assert all(lst.active.adapter.version == 20 for lst in await _listings(addrs))

    dropped = await _cli("rollback", "21", *where, *token)
    assert dropped.exit_code == 0 and "v21 dropped" in dropped.output, dropped.output
    assert all(21 not in {i.adapter.version for i in lst.adapters}
               for lst in await _listings(addrs))

    older = max(set.intersection(*({a.adapter.version for a in lst.adapters}
                                   for lst in await _listings(addrs))) - {20})
    unnamed = await _cli("rollback", *where, *token)
    assert unnamed.exit_code == 1 and "--to" in unnamed.output and f"v{older}" in unnamed.output
    assert all(lst.active.adapter.version == 20 for lst in await _listings(addrs))
    back = await _cli("rollback", "--to", str(older), *where, *token)
    assert back.exit_code == 0 and f"policy@v20 -> policy@v{older}" in back.output, back.output
    for listing in await _listings(addrs):
        assert listing.active.adapter.version == older
        assert 20 in {i.adapter.version for i in listing.adapters}  # kept: can be promoted


def test_the_learner_reads_the_verdict_from_the_replicas():
    """promotion canary, trainer side: active on every replica = promoted; neither staged nor
    active on any (unstaged, or dropped) = rolled back; still staged on some replicas = rolled
    back when the gateway says so, else undecided."""
    from services.trainer.ppo.canary_watch import outcome_from

    def listing(*versions, active=0):
        return policy_pb2.ListAdaptersResponse(adapters=[
            policy_pb2.AdapterInfo(adapter=policy_pb2.AdapterRef(name="policy", version=v),
                                   active=v == active, staged=v != active) for v in versions])

    assert outcome_from(5, [listing(4, 5, active=5)] * 2, []) == "promoted"
    assert outcome_from(5, [listing(4, 5, active=4), listing(4, 5, active=5)], []) is None
    assert outcome_from(5, [listing(4, active=4)] * 2, []) == "rolled_back"
    unstaged = listing(4, 5, active=4)
    unstaged.adapters[1].staged = False
    assert outcome_from(5, [unstaged] * 2, []) == "rolled_back"
    half = [unstaged, listing(4, 5, active=4)]
    assert outcome_from(5, half, []) is None
    assert outcome_from(5, half, [{"version": 5, "decision": "rolled_back"}]) == "rolled_back"
