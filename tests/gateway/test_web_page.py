"""The gateway's web page in headless Chromium (Debian's package, driven by Playwright) against
real services on 127.0.0.1: the session's vLLM policy (tiny model) with a pinned adapter
version, and a reward server scoring with a versioned reward model (`rm:@active`, the tiny
trained one). A user asks, sees which versions answered, picks one candidate, rates one, and the
feedback is in the admin export under the user's tenant."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.guard import key_id
from tests.fixtures.reward_helpers import start_reward
from tests.gateway.helpers import push_policy_version, start_gateway

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ADAPTER, VERSION = "webpage-test", 3
USER, ADMIN = "web-user-key-0123", "web-admin-key-4567"
PROMPT = "Write a short line about the sea."


@pytest.fixture(scope="module")
async def web_reward(tiny_rm, tmp_path_factory):
    handle = await start_reward(["rm:@active"], rm_store=tmp_path_factory.mktemp("rm-store"),
                                rm_initial=tiny_rm.path, admin_token="web-reward-admin",
                                max_text_chars=2000)
    yield handle
    await handle.close()


@pytest.fixture(scope="module")
async def web_gateway(policy_lora, web_reward, tiny_adapters, tmp_path_factory):
    # Its own adapter name, loaded but not active: other tests share this policy.
    await push_policy_version(policy_lora, tiny_adapters[1], VERSION, name=ADAPTER)
    gw = start_gateway(tmp_path_factory.mktemp("web-gw"), policy_lora.addr,
                       f"127.0.0.1:{web_reward.server.port}", adapter_name=ADAPTER,
                       api_keys=[USER, ADMIN], admin_api_keys=[ADMIN], max_n=8,
                       default_max_tokens=16)
    yield gw
    gw.stop()


def feedback_count(metrics_text: str, kind: str, tenant: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "rlhf_gateway_feedback":
            for s in family.samples:
                if (s.name.endswith("_total") and s.labels["kind"] == kind
                        and s.labels["tenant"] == tenant):
                    return s.value
    return 0.0


async def test_web_page_shows_versions_and_records_a_pick_and_a_rating(web_gateway):
    """22.6: ask, see the policy and reward-model versions per candidate, pick one, rate one
    (1-5); both are stored under the user's tenant (admin export) and counted per tenant."""
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is missing (scripts/debian-packages.txt)"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = await browser.new_page()
            await page.goto(web_gateway.url + "/")
            await page.fill("#api_key", USER)
            await page.fill("#prompt", PROMPT)
            await page.fill("#n", "3")
            await page.fill("#max_tokens", "8")
            await page.fill("#model", f"policy@v{VERSION}")
            await page.click("#submit")
            await page.wait_for_selector("li.candidate >> nth=2", timeout=120_000)
            # Which versions answered, on every candidate and in the status line.
            versions = await page.locator("li.candidate .version").all_text_contents()
            assert versions == [f"policy@v{VERSION} · reward model initial"] * 3
            assert f"policy@v{VERSION}" in await page.text_content("#status")
            scores = [float(s.split()[-1]) for s in
                      await page.locator("li.candidate .score").all_text_contents()]
            assert scores == sorted(scores, reverse=True)

            # Pick the second: its choice is recorded and the pick buttons are spent.
            second = page.locator("li.candidate").nth(1)
            chosen_text = await second.locator(".text").text_content()
            await second.locator("button.prefer").click()
            await page.wait_for_function(
                "document.querySelector('#status').textContent.startsWith('Thanks')")
            assert "chosen" in (await second.get_attribute("class")).split()
            assert await page.locator("button.prefer:disabled").count() == 3

            # Rate the first 4 of 5.
            first = page.locator("li.candidate").nth(0)
            first_index = int(await first.get_attribute("data-index"))
            first_text = await first.locator(".text").text_content()
            await first.locator("button.rate[data-rating='4']").click()
            await page.wait_for_function(
                "document.querySelector('#status').textContent.includes('rated 4 of 5')")
            assert await page.locator("button.rate:disabled").count() == 15
            assert "picked" in (await first.locator(
                "button.rate[data-rating='4']").get_attribute("class")).split()
        finally:
            await browser.close()

    tenant = key_id(USER)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=web_gateway.url, timeout=60) as c:
        pairs = await c.get("/v1/feedback/export", params={"tenant": tenant}, headers=admin)
        ratings = await c.get("/v1/feedback/export", params={"kind": "ratings", "tenant": tenant},
                              headers=admin)
        metrics = (await c.get("/metrics")).text
    assert pairs.status_code == 200 and ratings.status_code == 200, (pairs.text, ratings.text)
    pairs = [json.loads(x) for x in pairs.text.splitlines()]
    ratings = [json.loads(x) for x in ratings.text.splitlines()]
    assert any(p["prompt"] == PROMPT and p["chosen"] == chosen_text for p in pairs), pairs
    assert any(r["prompt"] == PROMPT and r["response"] == first_text and r["rating"] == 4
               for r in ratings), (first_index, ratings)
    assert feedback_count(metrics, "preference", tenant) >= 1
    assert feedback_count(metrics, "rating", tenant) >= 1
