"""Security drills for the gateway's feedback (22.1): who may give feedback on an answer, how
much, and who may export what every tenant asked.

A real gateway (uvicorn on 127.0.0.1) with its SQLite feedback store; the answers under attack
are written to that store as the gateway writes them (tenant = the asking key's id), so no
policy or reward server is needed. Each drill is an attack with its expected refusal.
"""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.feedback import FeedbackStore, StoredCandidate
from gateway.guard import key_id
from tests.gateway.helpers import closed_port, start_gateway

VICTIM, ATTACKER = "victim-key-0000000001", "attacker-key-00000002"
OPERATOR = "operator-admin-key-003"


@pytest.fixture
def gateway_with_answers(tmp_path):
    """A gateway with keys VICTIM and ATTACKER, admin key OPERATOR, and one stored answer of
    each tenant ("victim-answer", "attacker-answer") with three candidates."""
    gw = start_gateway(tmp_path, f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}",
                       api_keys=[VICTIM, ATTACKER], admin_api_keys=[OPERATOR])
    store = FeedbackStore(gw.config.feedback_url())
    for rid, key in (("victim-answer", VICTIM), ("attacker-answer", ATTACKER)):
        store.record_answer(rid, "best-of-n", "policy@v1", f"secret prompt of {rid}", None,
                            [StoredCandidate(i, f"{rid} candidate {i}", 0.0, "stop")
                             for i in range(3)], 0, tenant=key_id(key))
    yield gw, store
    store.close()
    gw.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_gateway_drill_feedback_on_another_tenants_answer(gateway_with_answers):
    """22.1: a tenant posts a choice and a rating on another tenant's answer (to poison the
    data the next reward model learns from): 404, the same as for an id never stored, so ids
    are no oracle either; nothing is recorded."""
    gw, store = gateway_with_answers
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        for body in ({"request_id": "victim-answer", "chosen_index": 2},
                     {"request_id": "victim-answer", "rating": 1}):
            r = await c.post("/v1/feedback", headers=_auth(ATTACKER), json=body)
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "unknown_request_id"
    assert list(store.export("preference")) == [] and list(store.export("ratings")) == []


async def test_gateway_drill_a_tenants_key_exports_feedback(gateway_with_answers):
    """22.1: a tenant's (non-admin) key asks for the export, all of it or its own tenant's:
    403 with a JSON body; only an admin key exports."""
    gw, store = gateway_with_answers
    store.record_feedback("victim-answer", 1, None, None, None, tenant=key_id(VICTIM))
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        for params in ({}, {"tenant": key_id(ATTACKER)}, {"kind": "ratings"}):
            r = await c.get("/v1/feedback/export", headers=_auth(ATTACKER), params=params)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "admin_key_required"
            assert "secret prompt" not in r.text
        ok = await c.get("/v1/feedback/export", headers=_auth(OPERATOR))
    assert ok.status_code == 200 and "secret prompt of victim-answer" in ok.text


async def test_gateway_drill_flooding_feedback_on_one_answer(gateway_with_answers):
    """22.1: a tenant posts 20 choices and 20 ratings on its own answer (to outweigh everyone
    else in the training data): the first of each is recorded, every other one is a 409 with a
    JSON body, and the export holds one choice's pairs."""
    gw, store = gateway_with_answers
    statuses = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        for i in range(20):
            for body in ({"request_id": "attacker-answer", "chosen_index": i % 3},
                         {"request_id": "attacker-answer", "rating": 1 + i % 5}):
                r = await c.post("/v1/feedback", headers=_auth(ATTACKER), json=body)
                statuses.append(r.status_code)
                if r.status_code == 409:
                    assert r.json()["error"]["code"] == "feedback_exists"
    assert statuses[:2] == [201, 201] and set(statuses[2:]) == {409}
    assert len(list(store.export("preference"))) == 2  # one choice: pairs with the 2 others
    assert len(list(store.export("ratings"))) == 1


async def test_gateway_drill_export_without_a_key(gateway_with_answers):
    """22.1: the export asked for with no key, or a made-up one: 401 with a JSON body and no
    row of anyone's feedback."""
    gw, store = gateway_with_answers
    store.record_feedback("victim-answer", 1, None, None, None, tenant=key_id(VICTIM))
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        for headers in ({}, _auth("made-up-key-123456789")):
            r = await c.get("/v1/feedback/export", headers=headers)
            assert r.status_code == 401, r.text
            assert json.loads(r.text)["error"]["code"] in ("missing_api_key", "invalid_api_key")
            assert "secret prompt" not in r.text
