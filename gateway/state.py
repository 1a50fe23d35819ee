"""What the route handlers share, created in the app's lifespan (never at import)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials

from gateway.config import GatewayConfig
from gateway.feedback import FeedbackStore, StoredCandidate
from gateway.guard import Guard, bearer, key_id
from gateway.metrics import GatewayMetrics
from gateway.upstream import Upstreams

# Response header saying whether an answer was stored for feedback ("true" / "false").
STORED_HEADER = "X-Feedback-Stored"


@dataclass
class GatewayState:
    config: GatewayConfig
    metrics: GatewayMetrics
    guard: Guard
    upstreams: Upstreams
    store: FeedbackStore
    admins: frozenset[str] = field(default_factory=frozenset)  # key ids of admin_api_keys

    async def store_call(self, fn, *args, **kwargs):
        """Feedback-store calls are blocking (SQLAlchemy); keep them off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def is_admin(self, caller: str) -> bool:
        """Admin keys may export every tenant's feedback; on a gateway without any key (open,
        started with a warning) every caller may."""
        return caller in self.admins or self.guard.open

    async def keep_answer(self, response: Response, caller: str, request_id: str,
                          endpoint: str, model: str, prompt: str, messages: list[dict] | None,
                          candidates: list[StoredCandidate], best_index: int) -> bool:
        """Stores a ranked answer for feedback under the caller's tenant. Past the tenant's
        `max_answers_per_tenant_per_day` the answer is still served, not stored: the response
        says so in X-Feedback-Stored (feedback on it would be a 404)."""
        stored = await self.store_call(
            self.store.record_answer, request_id, endpoint, model, prompt, messages, candidates,
            best_index, tenant=caller, daily_limit=self.config.max_answers_per_tenant_per_day)
        response.headers[STORED_HEADER] = "true" if stored else "false"
        if not stored:
            response.headers["X-Feedback-Not-Stored-Reason"] = (
                f"daily limit of {self.config.max_answers_per_tenant_per_day} stored answers "
                "per tenant reached")
        return stored


def admin_ids(keys: list[str]) -> frozenset[str]:
    return frozenset(key_id(k) for k in keys)


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "-"


def authorized(request: Request,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """Dependency of every /v1 route: the caller's key id (401 / 429 otherwise)."""
    return get_state(request).guard.check(request, credentials)


State = Annotated[GatewayState, Depends(get_state)]
Caller = Annotated[str, Depends(authorized)]
RequestId = Annotated[str, Depends(request_id)]
