"""Security drills of the gateway's canary (issue 21 point 5): its state is an admin surface.
A real gateway (uvicorn on 127.0.0.1) with the canary on; its upstreams are closed ports (the
canary's poll fails and retries, which these drills do not need); run from
tests/test_security_drills.py."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.helpers import closed_port, start_gateway

CANARY_USER = "drill-canary-user-0001"
CANARY_OWNER = "drill-canary-owner-002"


@pytest.fixture
def canary_drill_gateway(tmp_path):
    gw = start_gateway(tmp_path, f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}",
                       api_keys=[CANARY_USER], admin_api_keys=[CANARY_OWNER],
                       canary_fraction=0.1, canary_poll_seconds=60)
    yield gw
    gw.stop()


async def test_canary_state_needs_an_admin_key(canary_drill_gateway):
    """21.5: GET /v1/admin/canary (the rule, the running trial, the verdicts with their figures)
    answers 401 without a key and 403 to a tenant's key; an admin key reads it."""
    async with httpx.AsyncClient(base_url=canary_drill_gateway.url, timeout=30) as c:
        anonymous = await c.get("/v1/admin/canary")
        tenant = await c.get("/v1/admin/canary",
                             headers={"Authorization": f"Bearer {CANARY_USER}"})
        admin = await c.get("/v1/admin/canary",
                            headers={"Authorization": f"Bearer {CANARY_OWNER}"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["message"]
    assert tenant.status_code == 403
    assert tenant.json()["error"]["code"] == "admin_key_required"
    assert "trial" not in tenant.text and "decisions" not in tenant.text
    assert admin.status_code == 200 and admin.json()["enabled"] is True
    assert admin.json()["rule"]["min_requests"] == 200
