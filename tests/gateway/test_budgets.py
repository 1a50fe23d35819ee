"""Budgets that count work: sequences (prompts x n, best_of counting its draws) and tokens per
minute per API key. The arithmetic on an injected clock, then a real gateway (uvicorn, HTTP on
127.0.0.1) in front of a real policy gRPC server over the FakeEngine (slow tokens, a small
admission bound) and a rule-based reward server."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.budgets import OverBudget, TokenBuckets, TooLarge, WorkBudgets, text_tokens
from gateway.generation import work
from gateway.guard import key_id
from rlhf.formats import text_prompt
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import common_pb2
from services.policy.app import PolicyApp
from services.policy.config import PolicyConfig
from services.policy.fake_engine import FakeEngine
from tests.fixtures.policy_helpers import ADMIN
from tests.fixtures.reward_helpers import start_reward
from tests.gateway.helpers import start_gateway

FLOODER, OTHER = "budget-key-flooder-01", "budget-key-other-0002"
ADMISSION = 6  # the policy's max_pending_sequences
TOKEN_DELAY = 0.4  # seconds per generated token: a request holds its admission for a while
MAX_TOKENS = 8


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refusals_by_tenant(metrics_text: str, budget: str) -> dict[str, float]:
    return {s.labels["tenant"]: s.value
            for family in text_string_to_metric_families(metrics_text)
            if family.name == "rlhf_gateway_budget_refusals"
            for s in family.samples
            if s.name.endswith("_total") and s.labels["budget"] == budget}


# ---- the arithmetic -----------------------------------------------------------------------------

def test_work_counts_prompts_times_draws_and_tokens_up_front():
    """22.2: a request costs prompts x draws sequences, and its prompts' tokens (exact for token
    ids, estimated for text) plus max_tokens per sequence."""
    text = text_prompt("x" * 40)
    ids = common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5, 6, 7]))
    assert text_tokens("x" * 40) == 10 and text_tokens("é") == 1
    assert work([text], 4, 16) == (4, 10 + 4 * 16)
    assert work([text, ids], 3, 5) == (6, 10 + 3 + 6 * 5)


def test_work_budgets_charge_all_or_nothing_and_refill():
    now = [0.0]
    budgets = WorkBudgets(sequences_per_minute=6, tokens_per_minute=600, clock=lambda: now[0])
    budgets.charge("a", 4, 100)
    with pytest.raises(OverBudget) as refused:
        budgets.charge("a", 4, 100)  # 2 sequences left
    assert refused.value.budget == "sequences"
    assert refused.value.retry_after == pytest.approx(20.0)  # 2 more at 6/min
    # The refused call took nothing: 500 tokens are still there.
    budgets.charge("a", 2, 500)
    with pytest.raises(OverBudget) as refused:
        budgets.charge("a", 0, 1)
    assert refused.value.budget == "tokens"
    budgets.charge("b", 6, 600)  # keys don't share budgets
    now[0] += 60  # a minute later both are full again, and no fuller
    budgets.charge("a", 6, 600)
    with pytest.raises(TooLarge) as too_large:
        budgets.charge("a", 7, 1)
    assert (too_large.value.budget, too_large.value.limit) == ("sequences", 6)
    with pytest.raises(TooLarge):
        budgets.charge("a", 1, 601)
    off = WorkBudgets(0, 0)
    off.charge("a", 10**6, 10**9).settle(0)  # 0 = off


def test_settle_refunds_unused_tokens_and_charges_an_underestimate():
    now = [0.0]
    budgets = WorkBudgets(0, 600, clock=lambda: now[0])
    budgets.charge("a", 1, 500).settle(100)  # 400 of the 500 come back
    budgets.charge("a", 1, 500).settle(500)
    with pytest.raises(OverBudget):
        budgets.charge("a", 1, 1)
    # A prompt with more tokens than estimated leaves a debt the key waits off.
    now[0] += 60
    charge = budgets.charge("a", 1, 100)
    charge.settle(1100)
    charge.settle(0)  # settled once only
    with pytest.raises(OverBudget) as refused:
        budgets.charge("a", 1, 1)
    assert refused.value.retry_after == pytest.approx(50.1)  # from -500 back to 1 at 10/s


def test_token_buckets_take_costs_and_give_back():
    buckets = TokenBuckets(per_minute=60, burst=5, clock=lambda: 0.0)
    assert buckets.take("a", 3) == 0 and buckets.wait("a", 3) == pytest.approx(1.0)
    assert buckets.take("a", 3) == pytest.approx(1.0)  # refused: takes nothing
    buckets.give("a", 10)  # never above the burst
    assert buckets.take("a", 5) == 0 and buckets.take("a", 1) == pytest.approx(1.0)


# ---- a real gateway -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def slow_policy(tiny_model_dir, tmp_path_factory):
    cfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=tiny_model_dir,
        data_dir=tmp_path_factory.mktemp("budget-policy"), max_model_len=512,
        adapter_mode="lora", admin_token=ADMIN, default_max_tokens=MAX_TOKENS,
        max_pending_sequences=ADMISSION, drain_grace_seconds=1)
    engine = FakeEngine(vocab_size=512, max_model_len=512, token_delay=TOKEN_DELAY)
    server = await GrpcServer(cfg, PolicyApp(cfg, engine=engine)).start()
    yield server, engine
    await server.shutdown()


@pytest.fixture(scope="module")
async def budget_reward():
    handle = await start_reward(["rule:length?target=24&unit=chars"])
    yield handle
    await handle.close()


@pytest.fixture
def budget_gateway(slow_policy, budget_reward, tmp_path):
    """A gateway factory with the two keys; stopped after the test."""
    started = []

    def make(**overrides):
        server, _ = slow_policy
        gw = start_gateway(tmp_path / f"gw{len(started)}", f"127.0.0.1:{server.port}",
                           f"127.0.0.1:{budget_reward.server.port}",
                           api_keys=[FLOODER, OTHER], **overrides)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


async def _until_in_flight(engine: FakeEngine, requests: int) -> None:
    for _ in range(600):
        if engine.pending_requests() >= requests:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{engine.pending_requests()} requests reached the engine, "
                         f"not {requests}")


async def _flood(client: httpx.AsyncClient, count: int) -> list[asyncio.Task]:
    body = {"prompt": "flood", "n": 2, "max_tokens": MAX_TOKENS}
    return [asyncio.create_task(client.post("/v1/best-of-n", json=body, headers=auth(FLOODER)))
            for _ in range(count)]


async def test_without_budgets_one_key_takes_the_whole_admission(budget_gateway, slow_policy):
    """The control of the test below: with only a request rate, a key that floods fills the
    policy's admission and the other key is refused (503) while the flood is served."""
    _, engine = slow_policy
    gw = budget_gateway()
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as c:
        flood = await _flood(c, 8)
        await _until_in_flight(engine, ADMISSION // 2)
        other = await c.post("/v1/best-of-n", headers=auth(OTHER),
                             json={"prompt": "mine", "n": 2, "max_tokens": 2})
        codes = sorted(r.status_code for r in await asyncio.gather(*flood))
    assert other.status_code == 503 and other.json()["error"]["code"] == "upstream_overloaded"
    assert codes.count(200) == ADMISSION // 2 and set(codes) == {200, 503}


async def test_a_flooding_key_gets_429s_while_the_other_key_is_served(budget_gateway,
                                                                      slow_policy):
    """22.2: with sequences_per_minute under the policy's admission, the flooding key is refused
    429 (JSON naming the budget, Retry-After) and the other key keeps being served."""
    _, engine = slow_policy
    gw = budget_gateway(sequences_per_minute=ADMISSION - 2)
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as c:
        flood = await _flood(c, 8)
        await _until_in_flight(engine, (ADMISSION - 2) // 2)
        other = await c.post("/v1/best-of-n", headers=auth(OTHER),
                             json={"prompt": "mine", "n": 2, "max_tokens": 2})
        replies = await asyncio.gather(*flood)
        metrics = (await c.get("/metrics")).text
    assert other.status_code == 200, other.text
    assert sorted(r.status_code for r in replies) == [200] * 2 + [429] * 6
    refused = [r for r in replies if r.status_code == 429]
    for r in refused:
        error = r.json()["error"]
        assert error["code"] == "sequences_budget_exceeded" and error["type"] == "rate_limit_error"
        assert "sequences_per_minute" in error["message"]
        assert int(r.headers["retry-after"]) >= 1
    refusals = refusals_by_tenant(metrics, "sequences")
    assert refusals[key_id(FLOODER)] >= 6 and key_id(OTHER) not in refusals


async def test_best_of_and_prompt_lists_count_every_draw(budget_gateway):
    """22.2: /v1/completions charges prompts x max(n, best_of); a request above the whole budget
    is a 400 naming the parameter, never a 429 to retry."""
    gw = budget_gateway(sequences_per_minute=4)
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as c:
        ranked = {"model": "base", "prompt": "x", "n": 1, "best_of": 3, "max_tokens": 1}
        assert (await c.post("/v1/completions", json=ranked,
                             headers=auth(FLOODER))).status_code == 200
        again = await c.post("/v1/completions", json=ranked, headers=auth(FLOODER))
        assert again.status_code == 429, again.text  # 3 of 4 spent: best_of counted 3, not n=1
        two = {"model": "base", "prompt": ["a", "b"], "n": 2, "max_tokens": 1}
        assert (await c.post("/v1/completions", json=two,
                             headers=auth(OTHER))).status_code == 200
        big = {"model": "base", "prompt": "x", "n": 5, "max_tokens": 1}
        for _ in range(2):
            r = await c.post("/v1/completions", json=big, headers=auth(OTHER))
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "request_exceeds_budget" and error["param"] == "n"
            assert "sequences_per_minute=4" in error["message"]


async def test_tokens_budget_counts_max_tokens_per_sequence(budget_gateway):
    """22.2: tokens_per_minute charges the prompt and max_tokens for every sequence up front."""
    gw = budget_gateway(tokens_per_minute=45)
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as c:
        body = {"prompt": "abcd", "n": 3, "max_tokens": 6}  # 1 + 3 x 6 = 19 tokens, then
        # settled to the tokenizer's count of the prompt + 18 generated (the FakeEngine's)
        assert (await c.post("/v1/best-of-n", json=body,
                             headers=auth(FLOODER))).status_code == 200
        assert (await c.post("/v1/best-of-n", json=body,
                             headers=auth(FLOODER))).status_code == 200
        r = await c.post("/v1/best-of-n", json=body, headers=auth(FLOODER))
        assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_budget_exceeded"
        huge = await c.post("/v1/best-of-n", json={**body, "max_tokens": 20},
                            headers=auth(OTHER))
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "max_tokens"
