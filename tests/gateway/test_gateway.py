"""The gateway against real services on 127.0.0.1: the session's vLLM policy (tiny model) and a
rule-based reward server, over real HTTP (httpx, the official `openai` client, schemathesis, hey);
the web page's test is test_web_page.py."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import httpx
import openai
import pytest

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from tests.fixtures.reward_helpers import start_reward
from tests.gateway.helpers import (
    KEY,
    HungServer,
    closed_port,
    push_policy_version,
    start_gateway,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Length rule: candidates of different lengths get different scores, so the ranking is visible.
SCORER = "rule:length?target=24&unit=chars"
PINNED_VERSION = 7
ADAPTER = "gateway-test"


@pytest.fixture(scope="module")
async def reward():
    handle = await start_reward([SCORER])
    yield handle
    await handle.close()


@pytest.fixture(scope="module")
async def gw(policy_lora, reward, tmp_path_factory, tiny_adapters):
    # Its own adapter name: the trainer tests share this policy and train "policy" from v1.
    await push_policy_version(policy_lora, tiny_adapters[0], PINNED_VERSION, name=ADAPTER)
    thread = start_gateway(tmp_path_factory.mktemp("gw"), policy_lora.addr,
                           f"127.0.0.1:{reward.server.port}", max_n=8,
                           default_max_tokens=16, adapter_name=ADAPTER)
    yield thread
    thread.stop()


@pytest.fixture
async def http(gw):
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:
        yield client


def assert_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in err["message"]
    return err


async def direct_scores(reward, prompt: str, texts: list[str]) -> list[float]:
    stub = reward_pb2_grpc.RewardServiceStub(reward.channel)
    reply = await stub.Score(reward_pb2.ScoreRequest(items=[
        reward_pb2.ScoreItem(prompt=prompt, completion=t) for t in texts]))
    return [s.score for s in reply.scores]


# ---- best-of-n ----------------------------------------------------------------------------------

async def test_best_of_n_returns_the_highest_scored_candidate(http, reward):
    body = {"prompt": "Tell me about the river.", "n": 6, "max_tokens": 12, "seed": 11,
            "temperature": 1.0, "return_candidates": True}
    r = await http.post("/v1/best-of-n", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    cands = answer["candidates"]
    assert len(cands) == 6 and sorted(c["index"] for c in cands) == list(range(6))
    # The scores are the reward service's own, and the best is the argmax of them.
    by_index = sorted(cands, key=lambda c: c["index"])
    assert all(c["text"] for c in by_index)  # (an empty one would be unscored, ranked last)
    expected = await direct_scores(reward, body["prompt"], [c["text"] for c in by_index])
    assert [c["score"] for c in by_index] == pytest.approx(expected)
    assert answer["best"]["score"] == pytest.approx(max(expected))
    assert answer["best"]["text"] == by_index[expected.index(max(expected))]["text"]
    assert [c["rank"] for c in cands] == list(range(6))
    assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)
    assert len({c["text"] for c in cands}) > 1 and len(set(expected)) > 1
    assert answer["usage"]["completion_tokens"] > 0 and answer["usage"]["prompt_tokens"] > 0
    assert answer["request_id"] == r.headers["x-request-id"]
    # Without return_candidates only the best comes back.
    r = await http.post("/v1/best-of-n", json={**body, "return_candidates": False})
    assert r.json()["candidates"] is None and r.json()["best"]["text"]


async def test_best_of_n_model_selection_and_chat(http):
    base = (await http.post("/v1/best-of-n", json={"prompt": "Hi", "n": 2, "max_tokens": 4,
                                                   "model": "base"})).json()
    assert base["model"] == "base" and base["adapter_version"] == 0
    pinned = await http.post("/v1/best-of-n", json={
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}],
        "n": 2, "max_tokens": 4, "model": f"policy@v{PINNED_VERSION}"})
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["model"] == f"policy@v{PINNED_VERSION}"
    assert pinned.json()["adapter_version"] == PINNED_VERSION
    missing = await http.post("/v1/best-of-n", json={"prompt": "Hi", "n": 2,
                                                     "model": "policy@v999"})
    assert assert_error_shape(missing, 404)["message"]


# ---- OpenAI compatibility -----------------------------------------------------------------------

async def test_openai_client_completions_chat_models(gw, reward):
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    r = await client.completions.create(model="base", prompt="Once upon a time", n=3,
                                        max_tokens=6, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.model == "base"
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.completion_tokens > 0

    ranked = await client.completions.create(model="base", prompt="Once upon a time", n=2,
                                             best_of=5, max_tokens=10, seed=6)
    scores = [c.model_extra["score"] for c in ranked.choices]
    assert len(scores) == 2 and scores[0] >= scores[1]
    assert scores == pytest.approx(await direct_scores(
        reward, "Once upon a time", [c.text for c in ranked.choices]))

    chat = await client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "Say hi"}], n=2, max_tokens=5)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    assert chat.object == "chat.completion"

    best = await client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "Say hi"}], n=1, max_tokens=8,
        extra_body={"best_of": 3})
    assert best.choices[0].model_extra["score"] is not None

    ids = [m.id async for m in client.models.list()]
    assert ids[:2] == ["base", "policy"] and f"policy@v{PINNED_VERSION}" in ids

    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        await client.completions.create(model="base", prompt="x", n=3, best_of=2)


async def test_openai_streaming_matches_non_streaming(gw):
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    greedy = dict(model="base", max_tokens=10, temperature=0)
    full = await client.completions.create(prompt="The weather today", **greedy)
    stream = await client.completions.create(prompt="The weather today", stream=True, **greedy)
    pieces, finish = [], None
    async for event in stream:
        pieces.append(event.choices[0].text)
        finish = event.choices[0].finish_reason or finish
    assert len(pieces) > 2 and "".join(pieces) == full.choices[0].text
    assert finish == full.choices[0].finish_reason

    messages = [{"role": "user", "content": "Tell me a joke"}]
    full = await client.chat.completions.create(messages=messages, **greedy)
    stream = await client.chat.completions.create(messages=messages, stream=True, **greedy)
    text = "".join([e.choices[0].delta.content or "" async for e in stream])
    assert text == full.choices[0].message.content

    with pytest.raises(openai.BadRequestError, match="stream"):
        await client.completions.create(prompt="x", stream=True, n=2, **greedy)


# ---- feedback -----------------------------------------------------------------------------------

async def test_feedback_round_trip_into_rm_training(http, gw, tiny_model_dir, tmp_path):
    for i in range(6):
        answer = (await http.post("/v1/best-of-n", json={
            "prompt": f"Question {i}: how was your day?", "n": 3, "max_tokens": 8,
            "seed": i, "return_candidates": True})).json()
        worst = answer["candidates"][-1]["index"]
        r = await http.post("/v1/feedback", json={"request_id": answer["request_id"],
                                                  "chosen_index": worst})
        assert r.status_code == 201 and r.json()["kind"] == "preference"
        r = await http.post("/v1/feedback", json={"request_id": answer["request_id"],
                                                  "rating": 1 + i % 5})
        assert r.status_code == 201 and r.json()["kind"] == "rating"

    export = await http.get("/v1/feedback/export")
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/x-ndjson")
    pairs = [json.loads(line) for line in export.text.splitlines()]
    assert len(pairs) >= 6
    assert all({"prompt", "chosen", "rejected"} <= set(p) and p["chosen"] != p["rejected"]
               for p in pairs)
    ratings = [json.loads(x) for x in (await http.get(
        "/v1/feedback/export", params={"kind": "ratings"})).text.splitlines()]
    assert sorted({r["rating"] for r in ratings}) == [1, 2, 3, 4, 5]

    # The store is a real SQLite file in WAL mode.
    db = gw.config.data_dir / "gateway" / "feedback.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM feedback").fetchone()[0] >= 12

    # `rlhf train rm` accepts the export as it is.
    from tests.fixtures.reward_helpers import train_rm

    data = tmp_path / "prefs.jsonl"
    data.write_text(export.text)
    out = tmp_path / "rm"
    await asyncio.to_thread(train_rm, data, out, "--model", str(tiny_model_dir), "--backbone",
                            "full", "--epochs", "1", "--batch-size", "4", "--max-length", "48")
    assert (out / "config.json").exists()


async def test_feedback_errors(http):
    answer = (await http.post("/v1/best-of-n", json={"prompt": "x", "n": 2,
                                                     "max_tokens": 3})).json()
    rid = answer["request_id"]
    assert_error_shape(await http.post("/v1/feedback", json={"request_id": "nope",
                                                             "chosen_index": 0}), 404)
    err = assert_error_shape(await http.post("/v1/feedback", json={"request_id": rid,
                                                                   "chosen_index": 5}), 400)
    assert err["param"] == "chosen_index"
    for bad in ({"request_id": rid}, {"request_id": rid, "chosen_index": 0, "rating": 3},
                {"request_id": rid, "rating": 9}):
        assert_error_shape(await http.post("/v1/feedback", json=bad), 400)
    # A client-chosen request id that was already used cannot overwrite the stored answer.
    dup = await http.post("/v1/best-of-n", json={"prompt": "x", "n": 1, "max_tokens": 2},
                          headers={"x-request-id": rid})
    assert assert_error_shape(dup, 409)["code"] == "duplicate_request_id"


# ---- protection and errors ----------------------------------------------------------------------

async def test_api_keys_rate_limit_and_body_limit(policy_lora, reward, tmp_path):
    gw = start_gateway(tmp_path, policy_lora.addr, f"127.0.0.1:{reward.server.port}",
                       api_keys=[KEY], rate_limit_per_minute=6, rate_limit_burst=2,
                       max_body_bytes=2048)
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            err = assert_error_shape(await c.get("/v1/models"), 401)
            assert err["code"] == "missing_api_key"
            wrong = await c.get("/v1/models", headers={"Authorization": "Bearer wrong-key-123"})
            assert assert_error_shape(wrong, 401)["code"] == "invalid_api_key"
            auth = {"Authorization": f"Bearer {KEY}"}
            assert (await c.get("/v1/models", headers=auth)).status_code == 200
            assert (await c.get("/v1/models", headers=auth)).status_code == 200
            limited = await c.get("/v1/models", headers=auth)
            assert_error_shape(limited, 429)
            assert int(limited.headers["retry-after"]) >= 1
            # Health, readiness, metrics and the page stay open to probes and browsers.
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 200
            assert (await c.get("/")).status_code == 200
            big = await c.post("/v1/best-of-n", headers=auth,
                               json={"prompt": "x" * 5000, "n": 1})
            assert assert_error_shape(big, 413)["code"] == "request_too_large"

            async def chunks():
                for _ in range(4):
                    yield b" " * 1024

            streamed = await c.post("/v1/best-of-n", headers={**auth, "content-type":
                                    "application/json"}, content=chunks())
            assert_error_shape(streamed, 413)
    finally:
        gw.stop()


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, None),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, None),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "max_tokens": 100000}, None),
    ({"prompt": "", "n": 1}, "prompt"),
    ({"prompt": "x", "surprise": 1}, "surprise"),
    ({"messages": [{"role": "wizard", "content": "y"}]}, None),
])
async def test_bad_parameters_are_400(http, body, param):
    err = assert_error_shape(await http.post("/v1/best-of-n", json=body), 400)
    if param:
        assert param in (err["param"] or "") + err["message"]


async def test_bad_json_and_unsupported_openai_fields(http):
    r = await http.post("/v1/best-of-n", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert "JSON" in assert_error_shape(r, 400)["message"]
    for body in ({"model": "base", "prompt": "x", "logprobs": 2},
                 {"model": "base", "prompt": "x", "echo": True},
                 {"model": "base", "prompt": [[]]},
                 {"model": "base", "prompt": "x", "logit_bias": {"1": 2}}):
        assert_error_shape(await http.post("/v1/completions", json=body), 400)
    tools = {"model": "base", "messages": [{"role": "user", "content": "x"}],
             "tools": [{"type": "function"}]}
    assert assert_error_shape(await http.post("/v1/chat/completions", json=tools),
                              400)["param"] == "tools"


async def test_upstream_down_is_503_and_hung_is_504(policy_lora, reward, tmp_path):
    hung = HungServer()
    down = start_gateway(tmp_path / "down", f"127.0.0.1:{closed_port()}",
                         f"127.0.0.1:{reward.server.port}")
    slow = start_gateway(tmp_path / "slow", policy_lora.addr, f"127.0.0.1:{hung.port}",
                         upstream_timeout_seconds=1.5)
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(down.url + "/v1/best-of-n", json={"prompt": "x", "n": 2})
            assert assert_error_shape(r, 503)["code"] == "upstream_unavailable"
            assert r.headers["retry-after"] == "1"
            ready = await c.get(down.url + "/readyz")
            assert "policy" in assert_error_shape(ready, 503)["message"]
            assert (await c.get(down.url + "/healthz")).status_code == 200

            r = await c.post(slow.url + "/v1/best-of-n",
                             json={"prompt": "x", "n": 2, "max_tokens": 3})
            assert assert_error_shape(r, 504)["code"] == "upstream_timeout"
            assert "reward" in r.json()["error"]["message"]
    finally:
        down.stop()
        slow.stop()
        hung.close()


async def test_health_readiness_and_metrics(http):
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = (await http.get("/readyz")).json()
    assert ready["upstreams"] == {"policy": True, "reward": True}
    await http.post("/v1/best-of-n", json={"prompt": "metrics", "n": 3, "max_tokens": 3})
    text = (await http.get("/metrics")).text

    def value(pattern: str) -> float:
        match = re.search(pattern + r" ([0-9.e+]+)", text)
        assert match, pattern
        return float(match.group(1))

    assert value(r'rlhf_gateway_http_requests_total\{route="/v1/best-of-n",status="200"\}') >= 1
    assert value(r'rlhf_gateway_http_request_seconds_count\{route="/v1/best-of-n"\}') >= 1
    assert value(r"rlhf_gateway_best_of_n_count") >= 1
    assert value(r'rlhf_gateway_upstream_seconds_count\{method="Score",service="reward"\}') >= 1
    assert value(r'rlhf_gateway_http_requests_total\{route="/v1/feedback",status="404"\}') >= 1


# ---- fuzzing and load ---------------------------------------------------------------------------

async def test_schemathesis_finds_no_server_error_or_undocumented_status(gw, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    proc = await asyncio.create_subprocess_exec(
        st, "run", gw.url + "/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance",
        "--max-examples", "15", "--seed", "7", "--no-shrink", "--request-timeout", "120",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path)
    out, _ = await proc.communicate()
    report = out.decode()
    assert proc.returncode == 0, report[-4000:]
    assert re.search(r"\d+ generated, (\d+) passed", report), report[-2000:]


async def test_load_concurrency_32_without_errors(gw):
    hey = shutil.which("hey")
    assert hey, "Debian's hey package is missing (scripts/debian-packages.txt)"
    body = json.dumps({"prompt": "Load test prompt", "n": 2, "max_tokens": 6})
    proc = await asyncio.create_subprocess_exec(
        hey, "-n", "160", "-c", "32", "-t", "120", "-m", "POST", "-T", "application/json",
        "-d", body, gw.url + "/v1/best-of-n",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    report = out.decode()
    assert proc.returncode == 0, report
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", report))
    assert codes == {"200": "160"}, report
    assert "Error distribution" not in report, report


async def test_calls_are_balanced_per_call_across_reward_replicas(policy_lora, reward, tmp_path):
    # Two replicas that score the same text differently tell which one answered each call.
    other = await start_reward(["rule:length?target=3&unit=chars"])
    gw = start_gateway(tmp_path, policy_lora.addr,
                       f"127.0.0.1:{reward.server.port},127.0.0.1:{other.server.port}")
    try:
        seen = set()
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            for _ in range(6):
                r = await c.post("/v1/best-of-n", json={"prompt": "Same prompt", "n": 1,
                                                        "max_tokens": 6, "temperature": 0})
                assert r.status_code == 200, r.text
                seen.add((r.json()["best"]["text"], r.json()["best"]["score"]))
        assert len({text for text, _ in seen}) == 1 and len(seen) == 2, seen
    finally:
        gw.stop()
        await other.close()


async def test_model_a_merged_policy_cannot_serve_is_409(policy_merged, reward, tmp_path):
    gw = start_gateway(tmp_path, policy_merged.addr, f"127.0.0.1:{reward.server.port}")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            r = await c.post("/v1/best-of-n", json={"prompt": "x", "n": 1, "max_tokens": 2,
                                                    "model": "base"})
            err = assert_error_shape(r, 409)
            assert err["code"] == "model_unavailable" and "base" in err["message"]
            ok = await c.post("/v1/best-of-n", json={"prompt": "x", "n": 1, "max_tokens": 2,
                                                     "model": "policy"})
            assert ok.status_code == 200, ok.text
    finally:
        gw.stop()
