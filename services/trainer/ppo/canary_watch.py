"""What became of the versions the learner left staged for the gateway's canary (`promotion:
canary`), read where the verdict lands: the policy replicas. Active on every replica: promoted.
Neither staged nor active on any: rolled back (the canary ends its staging, it stays servable to
the learner's pinned rollouts) or expired (dropped: nobody decided before the stage deadline).
With `canary_gateway_url` the reason and figures of a rollback are read from the gateway's
GET /v1/admin/canary (admin key `canary_gateway_key`); without it the outcome alone is recorded
and the reason is in the gateway's log."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("rlhf.trainer.canary")


@dataclass
class Outcome:
    version: int
    decision: str  # promoted | rolled_back
    reason: str


def outcome_from(version: int, listings: list, gateway_decisions: list[dict]) -> str | None:
    """"promoted", "rolled_back" or None (undecided: still staged, or the verdict applied on
    some replicas only), from every replica's ListAdaptersResponse."""
    kept = [{a.adapter.version: a for a in lst.adapters} for lst in listings]
    if kept and all(version in k and k[version].active for k in kept):
        return "promoted"
    if all(version not in k or not (k[version].staged or k[version].active) for k in kept):
        return "rolled_back"
    if any(d.get("version") == version and d.get("decision") == "rolled_back"
           for d in gateway_decisions):
        return "rolled_back"  # dropped on some replicas, the others follow
    return None


class CanaryWatch:
    def __init__(self, policy, adapter_name: str, gateway_url: str | None = None,
                 gateway_key: str | None = None, clock=time.monotonic):
        self.policy = policy
        self.name = adapter_name
        self.gateway_url = gateway_url.rstrip("/") if gateway_url else None
        self.gateway_key = gateway_key
        self.clock = clock
        self.pending: dict[int, float] = {}  # version -> when it was handed over

    def handed(self, version: int) -> None:
        self.pending[version] = self.clock()

    async def _gateway_decisions(self) -> list[dict]:
        if self.gateway_url is None:
            return []
        import httpx

        headers = {"Authorization": f"Bearer {self.gateway_key}"} if self.gateway_key else {}
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                r = await client.get(f"{self.gateway_url}/v1/admin/canary", headers=headers)
            r.raise_for_status()
            return list(r.json().get("decisions") or [])
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("canary verdicts not read from the gateway at %s: %s",
                        self.gateway_url, exc)
            return []

    async def poll(self) -> list[Outcome]:
        """Verdicts reached since the last poll (none while every version is undecided)."""
        if not self.pending:
            return []
        endpoints = self.policy.endpoints()
        listings = await asyncio.gather(*(self.policy.list_adapters(
            self.name, endpoint=ep, timeout=10.0) for ep in endpoints))
        decisions = await self._gateway_decisions()
        done = []
        for version in sorted(self.pending):
            decision = outcome_from(version, listings, decisions)
            if decision is None:
                continue
            del self.pending[version]
            verdict = next((d for d in reversed(decisions) if d.get("version") == version), None)
            if verdict is not None and verdict.get("decision") == decision:
                reason = "; ".join(verdict.get("reasons") or []) or "not worse than the incumbent"
            elif decision == "rolled_back":
                reason = ("neither staged nor active on any replica: rolled back by the "
                          "gateway's canary or expired at its stage deadline (see the gateway's "
                          "log)")
            else:
                reason = "active on every replica"
            done.append(Outcome(version, decision, reason))
        return done
