"""What the route handlers share, created in the app's lifespan (never at import)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from gateway.config import GatewayConfig
from gateway.feedback import FeedbackStore
from gateway.guard import Guard, bearer
from gateway.metrics import GatewayMetrics
from gateway.upstream import Upstreams


@dataclass
class GatewayState:
    config: GatewayConfig
    metrics: GatewayMetrics
    guard: Guard
    upstreams: Upstreams
    store: FeedbackStore

    async def store_call(self, fn, *args):
        """Feedback-store calls are blocking (SQLAlchemy); keep them off the event loop."""
        return await asyncio.to_thread(fn, *args)


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
