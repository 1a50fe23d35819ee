"""Security drills of the gateway's work budgets (issue 22 point 2): ways a key could try to get
more work from the policy than its sequences and tokens per minute, each refused. A real gateway
(uvicorn on 127.0.0.1) in front of a real policy gRPC server over the FakeEngine and a rule-based
reward server; run from tests/test_security_drills.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from rlhf.plumbing.server import GrpcServer
from services.policy.app import PolicyApp
from services.policy.config import PolicyConfig
from services.policy.fake_engine import FakeEngine
from tests.fixtures.policy_helpers import ADMIN
from tests.fixtures.reward_helpers import start_reward
from tests.gateway.helpers import start_gateway

BUDGETS_KEY = "drill-budget-key-0001"
BUDGETS_AUTH = {"Authorization": f"Bearer {BUDGETS_KEY}"}


@pytest.fixture(scope="module")
async def budgets_upstreams(tiny_model_dir, tmp_path_factory):
    """(policy address, reward address): the FakeEngine policy answers at once."""
    cfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=tiny_model_dir,
        data_dir=tmp_path_factory.mktemp("drill-budget-policy"), max_model_len=512,
        adapter_mode="lora", admin_token=ADMIN, default_max_tokens=4, drain_grace_seconds=1)
    policy = await GrpcServer(cfg, PolicyApp(cfg, engine=FakeEngine(vocab_size=512))).start()
    reward = await start_reward(["rule:length?target=24&unit=chars"])
    yield f"127.0.0.1:{policy.port}", f"127.0.0.1:{reward.server.port}"
    await reward.close()
    await policy.shutdown()


@pytest.fixture
def budgets_gateway(budgets_upstreams, tmp_path):
    started = []

    def make(**budgets):
        gw = start_gateway(tmp_path / f"gw{len(started)}", *budgets_upstreams,
                           api_keys=[BUDGETS_KEY], **budgets)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


async def test_concurrent_requests_cannot_overdraw_the_sequences_budget(budgets_gateway):
    """22.2: twenty requests of one sequence sent at once, against sequences_per_minute=5:
    exactly five reach the policy, the others are 429 (the charge is one atomic step, so
    requests in flight together cannot all see the same unspent budget)."""
    gw = budgets_gateway(sequences_per_minute=5)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        replies = await asyncio.gather(*[
            c.post("/v1/best-of-n", headers=BUDGETS_AUTH,
                   json={"prompt": f"p{i}", "n": 1, "max_tokens": 2}) for i in range(20)])
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 5 + [429] * 15, codes


async def test_streaming_is_charged_like_any_completion(budgets_gateway):
    """22.2: `stream: true` is no way around the budget: with sequences_per_minute=2 the third
    stream is refused 429 before any event is sent."""
    gw = budgets_gateway(sequences_per_minute=2)
    body = {"model": "base", "prompt": "stream me", "max_tokens": 2, "stream": True}
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        for _ in range(2):
            r = await c.post("/v1/completions", headers=BUDGETS_AUTH, json=body)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
        r = await c.post("/v1/completions", headers=BUDGETS_AUTH, json=body)
    assert r.status_code == 429 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "sequences_budget_exceeded"


async def test_a_prompt_denser_than_estimated_is_charged_its_real_tokens(budgets_gateway):
    """22.2: text the up-front estimate undercounts (characters the tokenizer splits into one
    token per byte) is charged the policy's own count once answered, so the key's next request
    waits off the difference instead of passing on the estimate."""
    prompt = "ξ" * 100  # 200 UTF-8 bytes: estimated 50 tokens, about 200 for the tiny tokenizer
    gw = budgets_gateway(tokens_per_minute=110)
    body = {"prompt": prompt, "n": 1, "max_tokens": 1}
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        first = await c.post("/v1/best-of-n", headers=BUDGETS_AUTH, json=body)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["prompt_tokens"] >= 150  # the premise: a 3x undercount
        second = await c.post("/v1/best-of-n", headers=BUDGETS_AUTH, json=body)
    # On the estimate alone 51 + 51 tokens would fit in 110.
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "tokens_budget_exceeded"
    assert int(second.headers["retry-after"]) > 30
