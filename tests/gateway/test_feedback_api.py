"""Feedback ownership over HTTP: a real gateway (uvicorn on 127.0.0.1) in front of a real policy
gRPC server over the FakeEngine and a rule-based reward server, and its SQLite feedback store.
Tenants own their answers, admin keys export, the daily limit, the periodic purge, and the
export's memory with 100k stored answers (a gateway process of its own, its RSS measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import insert, update

from gateway.config import GatewayConfig
from gateway.feedback import DAY, FeedbackStore, StoredCandidate, answers, counters, feedback
from gateway.guard import key_id
from rlhf.plumbing.config import ConfigError
from rlhf.plumbing.server import GrpcServer
from services.policy.app import PolicyApp
from services.policy.config import PolicyConfig
from services.policy.fake_engine import FakeEngine
from tests.fixtures.policy_helpers import ADMIN
from tests.fixtures.reward_helpers import start_reward
from tests.gateway.helpers import closed_port, start_gateway

ALICE, BOB, CAROL = "alice-key-000000001", "bob-key-00000000002", "carol-key-0000000003"
OWNER = "owner-admin-key-00004"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
async def fb_upstreams(tiny_model_dir, tmp_path_factory):
    cfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=tiny_model_dir,
        data_dir=tmp_path_factory.mktemp("fb-policy"), max_model_len=512, adapter_mode="lora",
        admin_token=ADMIN, default_max_tokens=8, drain_grace_seconds=1)
    policy = await GrpcServer(cfg, PolicyApp(cfg, engine=FakeEngine(
        vocab_size=512, max_model_len=512))).start()
    reward = await start_reward(["rule:length?target=24&unit=chars"])
    yield f"127.0.0.1:{policy.port}", f"127.0.0.1:{reward.server.port}"
    await reward.close()
    await policy.shutdown()


@pytest.fixture
def fb_gateway(fb_upstreams, tmp_path):
    """Factory of gateways with keys ALICE, BOB, CAROL and admin key OWNER (on the FakeEngine
    policy); stopped after the test."""
    started = []

    def make(**overrides):
        settings = dict(api_keys=[ALICE, BOB, CAROL], admin_api_keys=[OWNER])
        settings.update(overrides)
        gw = start_gateway(tmp_path / f"gw{len(started)}", *fb_upstreams, **settings)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def store_of(gw, clock=None) -> FeedbackStore:
    return FeedbackStore(gw.config.feedback_url(), **({"clock": clock} if clock else {}))


def seed(store: FeedbackStore, rid: str, tenant: str, chosen: int | None = 1) -> None:
    """An answer as the gateway stores it, with the tenant's choice."""
    store.record_answer(rid, "best-of-n", "policy@v1", f"prompt {rid}", None,
                        [StoredCandidate(i, f"{rid} text {i}", float(i), "stop")
                         for i in range(3)], 0, tenant=tenant)
    if chosen is not None:
        store.record_feedback(rid, chosen, None, None, None, tenant=tenant)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


def lines(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.text.splitlines()]


async def test_answers_belong_to_the_tenant_that_asked(fb_gateway):
    """22.1: best-of-n stores the answer under the caller's key id (never the key); feedback
    from another key is a 404 like an unknown id; a second choice or rating is a 409."""
    gw = fb_gateway()
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        r = await c.post("/v1/best-of-n", headers=auth(ALICE), json={
            "prompt": "Say something.", "n": 3, "max_tokens": 6, "return_candidates": True})
        assert r.status_code == 200, r.text
        assert r.headers["x-feedback-stored"] == "true"
        rid = r.json()["request_id"]
        theirs = await c.post("/v1/feedback", headers=auth(BOB),
                              json={"request_id": rid, "chosen_index": 1})
        never = await c.post("/v1/feedback", headers=auth(BOB),
                             json={"request_id": "x" + rid[1:], "chosen_index": 1})
        assert error_of(theirs, 404)["code"] == error_of(never, 404)["code"] == \
            "unknown_request_id"
        ok = await c.post("/v1/feedback", headers=auth(ALICE),
                          json={"request_id": rid, "chosen_index": 1})
        assert ok.status_code == 201, ok.text
        again = await c.post("/v1/feedback", headers=auth(ALICE),
                             json={"request_id": rid, "chosen_index": 2})
        assert error_of(again, 409)["code"] == "feedback_exists"
        assert (await c.post("/v1/feedback", headers=auth(ALICE),
                             json={"request_id": rid, "rating": 4})).status_code == 201
        assert error_of(await c.post("/v1/feedback", headers=auth(ALICE), json={
            "request_id": rid, "rating": 2}), 409)["code"] == "feedback_exists"
        # OpenAI completions ranked with best_of are stored for feedback too, under their key.
        r = await c.post("/v1/completions", headers=auth(BOB), json={
            "model": "policy", "prompt": "Hi", "n": 1, "best_of": 2, "max_tokens": 4})
        assert r.status_code == 200 and r.headers["x-feedback-stored"] == "true"
        bob_rid = r.json()["id"].removeprefix("cmpl-")
        assert (await c.post("/v1/feedback", headers=auth(BOB),
                             json={"request_id": bob_rid, "rating": 5})).status_code == 201
        export = await c.get("/v1/feedback/export", headers=auth(OWNER))
        rows = lines(export)
    assert {r["tenant"] for r in rows} == {key_id(ALICE)}
    assert {r["request_id"] for r in rows} == {rid}
    assert ALICE not in export.text and BOB not in export.text


async def test_answers_past_the_daily_limit_are_served_but_not_stored(fb_gateway):
    """22.1: max_answers_per_tenant_per_day: the answer is still served, with
    X-Feedback-Stored: false, and feedback on it is a 404; another tenant still stores."""
    gw = fb_gateway(max_answers_per_tenant_per_day=2)
    body = {"prompt": "Count.", "n": 2, "max_tokens": 4}
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        replies = [await c.post("/v1/best-of-n", headers=auth(CAROL), json=body)
                   for _ in range(3)]
        assert [r.status_code for r in replies] == [200] * 3
        assert [r.headers["x-feedback-stored"] for r in replies] == ["true", "true", "false"]
        assert "daily limit of 2" in replies[2].headers["x-feedback-not-stored-reason"]
        late = await c.post("/v1/feedback", headers=auth(CAROL), json={
            "request_id": replies[2].json()["request_id"], "chosen_index": 0})
        assert error_of(late, 404)["code"] == "unknown_request_id"
        other = await c.post("/v1/best-of-n", headers=auth(ALICE), json=body)
        assert other.headers["x-feedback-stored"] == "true"


async def test_export_needs_an_admin_key_and_filters_and_resumes(fb_gateway):
    """22.1: GET /v1/feedback/export: 401 without a key, 403 for a tenant's key; for an admin
    key it filters by tenant, since/until (unix seconds or ISO 8601) and kind, and `after=`
    the last record's cursor returns only newer records."""
    gw = fb_gateway()
    clock = [T := 1_767_225_600.0]
    store = store_of(gw, clock=lambda: clock[0])
    for i in range(6):
        clock[0] = T + 60 * i
        seed(store, f"r{i}", key_id(ALICE) if i % 2 == 0 else key_id(BOB))
    store.record_feedback("r0", None, 3, None, None, tenant=key_id(ALICE))
    store.close()
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        assert error_of(await c.get("/v1/feedback/export"), 401)["code"] == "missing_api_key"
        denied = await c.get("/v1/feedback/export", headers=auth(ALICE))
        assert error_of(denied, 403)["code"] == "admin_key_required"
        admin = auth(OWNER)
        full = lines(await c.get("/v1/feedback/export", headers=admin))
        assert len(full) == 12 and [r["cursor"] for r in full] == sorted(r["cursor"] for r in full)
        mine = lines(await c.get("/v1/feedback/export", headers=admin,
                                 params={"tenant": key_id(BOB)}))
        assert mine == [r for r in full if r["tenant"] == key_id(BOB)]
        window = lines(await c.get("/v1/feedback/export", headers=admin, params={
            "since": "2026-01-01T00:02:00Z", "until": str(T + 240)}))
        assert sorted({r["request_id"] for r in window}) == ["r2", "r3"]
        first = lines(await c.get("/v1/feedback/export", headers=admin, params={"limit": 5}))
        rest = lines(await c.get("/v1/feedback/export", headers=admin,
                                 params={"after": first[-1]["cursor"]}))
        assert first + rest == full
        assert lines(await c.get("/v1/feedback/export", headers=admin,
                                 params={"after": full[-1]["cursor"]})) == []
        ratings = lines(await c.get("/v1/feedback/export", headers=admin,
                                    params={"kind": "ratings"}))
        assert [(r["rating"], r["tenant"]) for r in ratings] == [(3, key_id(ALICE))]
        for params, param in (({"after": "not-a-cursor"}, "after"),
                              ({"since": "yesterday"}, "since"), ({"until": "nan"}, "until")):
            bad = await c.get("/v1/feedback/export", headers=admin, params=params)
            assert error_of(bad, 400)["param"] == param


async def test_an_open_gateway_records_the_client_address_as_tenant(fb_gateway):
    """22.1: without keys the tenant is the client address (`ip:...`), and the export is as
    open as the rest of that gateway (it starts with a warning saying so)."""
    gw = fb_gateway(api_keys=[], admin_api_keys=[])
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        r = await c.post("/v1/best-of-n", json={"prompt": "Open.", "n": 2, "max_tokens": 4})
        assert (await c.post("/v1/feedback", json={"request_id": r.json()["request_id"],
                                                   "chosen_index": 1})).status_code == 201
        rows = lines(await c.get("/v1/feedback/export"))
    assert {row["tenant"] for row in rows} == {"ip:127.0.0.1"}


async def test_the_gateway_purges_answers_past_retention_periodically(fb_gateway):
    """22.1: feedback_retention_days is enforced by the gateway's own periodic purge: answers
    stored two days ago (by a store whose clock says so) and their feedback disappear, today's
    stay."""
    gw = fb_gateway(feedback_retention_days=1, feedback_purge_interval_seconds=0.2)
    old = store_of(gw, clock=lambda: time.time() - 2 * DAY)
    seed(old, "old", key_id(ALICE))
    old.close()
    store = store_of(gw)
    seed(store, "new", key_id(ALICE))
    try:
        for _ in range(600):
            left = {r["request_id"] for r in store.export()}
            if left == {"new"}:
                break
            time.sleep(0.05)
        assert left == {"new"}
    finally:
        store.close()


# ---- memory of the export -----------------------------------------------------------------------

ROWS = 100_000
RSS_CAP = 48 * 2**20  # bytes the gateway's peak RSS may grow by while exporting every row


def _bulk_seed(url: str, rows: int) -> None:
    """100k answers with a choice each, written in bulk (what months of traffic would leave)."""
    store = FeedbackStore(url)
    filler = "lorem ipsum dolor sit amet " * 18
    with store.engine.begin() as conn:
        for start in range(0, rows, 5000):
            ids = range(start + 1, min(rows, start + 5000) + 1)
            conn.execute(insert(answers), [dict(
                id=i, tenant=key_id(ALICE), request_id=f"r{i}", created_at=1.7e9 + i,
                endpoint="best-of-n", model="policy@v1", prompt=f"question {i} " + filler[:80],
                messages=None, best_index=0, candidates=json.dumps([
                    {"index": k, "text": f"answer {i}.{k} " + filler, "score": 0.0,
                     "finish_reason": "stop"} for k in range(2)])) for i in ids])
            conn.execute(insert(feedback), [dict(
                seq=i, answer_id=i, tenant=key_id(ALICE), kind="preference",
                created_at=1.7e9 + i, chosen_index=1) for i in ids])
        conn.execute(update(counters).values(value=rows))
    store.close()


def _memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.mark.slow
def test_export_of_100k_answers_streams_in_bounded_memory(tmp_path):
    """22.1: the export streams: a gateway process exporting 100k stored pairs (over 100 MB of
    JSON) grows its peak RSS by less than RSS_CAP."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    _bulk_seed(url, ROWS)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "http_port": 0, "data_dir": str(tmp_path / "data"), "feedback_db": url,
        "policy_addr": [f"127.0.0.1:{closed_port()}"],
        "reward_addr": [f"127.0.0.1:{closed_port()}"],
        "api_keys": [ALICE], "admin_api_keys": [OWNER], "rate_limit_per_minute": 0,
        "feedback_retention_days": 0, "log_level": "WARNING"}))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port, said = None, []
        for line in proc.stdout:
            said.append(line)
            if line.startswith("READY gateway http="):
                port = int(line.split("=")[1])
                break
        assert port, "the gateway did not start:\n" + "".join(said[-20:])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth(OWNER),
                          timeout=600) as c:
            warm = c.get("/v1/feedback/export", params={"limit": 2000})
            assert len(warm.text.splitlines()) == 2000
            before = _memory(proc.pid)["VmRSS"]
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
            count = size = 0
            with c.stream("GET", "/v1/feedback/export") as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    count += 1
                    size += len(line) + 1
            growth = _memory(proc.pid)["VmHWM"] - before
    finally:
        proc.terminate()
        proc.wait(30)
    assert count == ROWS
    assert size > 2 * RSS_CAP  # holding the export in memory could not pass
    assert growth < RSS_CAP, f"peak RSS grew by {growth / 2**20:.1f} MiB"


def test_admin_keys_are_checked_like_api_keys(tmp_path):
    with pytest.raises(ConfigError, match="admin_api_keys: .*at least 8 characters"):
        GatewayConfig.load(data_dir=tmp_path, admin_api_keys=["short"])
    cfg = GatewayConfig.load(data_dir=tmp_path, admin_api_keys=f"{OWNER},{ALICE}")
    assert cfg.admin_api_keys == [OWNER, ALICE]
