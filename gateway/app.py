"""The FastAPI app: routes, middleware, error shape, and the lifespan that opens the gRPC
channels and the feedback store (nothing connects at import)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway import api_best_of_n, api_feedback, api_openai, canary, errors
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.feedback import DuplicateAnswer, FeedbackStore
from gateway.guard import Guard
from gateway.metrics import GatewayMetrics
from gateway.middleware import BodyLimit, RequestContext
from gateway.schemas import ErrorResponse
from gateway.state import GatewayState, State, admin_ids
from gateway.upstream import Upstreams
from rlhf import __version__

log = logging.getLogger("rlhf.gateway")

# Documented on every route, so clients (and schemathesis) know each status we may answer.
_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in {
    400: "Invalid parameters", 401: "Missing or invalid API key",
    403: "An admin key is needed (feedback export)", 404: "Unknown model or id",
    409: "Request id already used, feedback already recorded, or the policy can't serve that "
         "model as configured",
    413: "Body too large", 429: "A request, sequence or token budget is spent (see Retry-After)",
    500: "Internal error", 502: "Upstream failed", 503: "Upstream unavailable or overloaded",
    504: "Upstream timed out"}.items()}


async def purge_periodically(state: GatewayState) -> None:
    """Enforces feedback_retention_days: a purge at start-up, then every purge interval. A failed
    purge (database down) is logged and retried at the next interval."""
    retention = state.config.feedback_retention_days * 86400
    while True:
        try:
            gone, gone_feedback = await state.store_call(state.store.purge, retention)
            if gone:
                log.info("feedback purge: %d answers and %d feedback records past %g days "
                         "deleted", gone, gone_feedback, state.config.feedback_retention_days)
        except Exception:  # noqa: BLE001 - the loop must outlive a database outage
            log.exception("feedback purge failed; retrying in %g s",
                          state.config.feedback_purge_interval_seconds)
        await asyncio.sleep(state.config.feedback_purge_interval_seconds)


def create_app(config: GatewayConfig) -> FastAPI:
    metrics = GatewayMetrics.create()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not (config.api_keys or config.admin_api_keys):
            log.warning("no api_keys configured: the gateway is open to anyone who can reach it, "
                        "and anyone may export every answer and feedback it stored")
        upstreams = Upstreams(config, metrics)
        await upstreams.open()
        store = FeedbackStore(config.feedback_url())
        app.state.gateway = GatewayState(
            config=config, metrics=metrics,
            guard=Guard(config.api_keys + config.admin_api_keys, config.rate_limit_per_minute,
                        config.rate_limit_burst,
                        sequences_per_minute=config.sequences_per_minute,
                        tokens_per_minute=config.tokens_per_minute,
                        refusals=metrics.budget_refusals),
            upstreams=upstreams, store=store, admins=admin_ids(config.admin_api_keys))
        purging = (asyncio.create_task(purge_periodically(app.state.gateway))
                   if config.feedback_retention_days > 0 else None)
        polling = None
        if config.canary_fraction > 0:
            upstreams.canary = canary.Canary(config, upstreams, metrics,
                                             config.resolved_policy_admin_token())
            polling = asyncio.create_task(upstreams.canary.run())
        try:
            yield
        finally:
            if polling is not None:
                polling.cancel()
                await asyncio.gather(polling, return_exceptions=True)
                await upstreams.canary.close()
            if purging is not None:
                purging.cancel()
                await asyncio.gather(purging, return_exceptions=True)
            await upstreams.close()
            store.close()

    app = FastAPI(title="rlhf-grpc gateway", version=__version__, lifespan=lifespan,
                  responses=_ERRORS,
                  description="Best-of-n answers ranked by a reward model, OpenAI-compatible "
                              "completions, and feedback collection.")
    errors.install(app)

    @app.exception_handler(DuplicateAnswer)
    async def _duplicate(request, exc: DuplicateAnswer):
        return errors.error_response(409, str(exc), "duplicate_request_id")

    for module in (api_best_of_n, api_openai, api_feedback, canary):
        app.include_router(module.router)

    @app.get("/healthz", summary="The process is up", responses={})
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Policy and reward are reachable",
             responses={503: {"model": ErrorResponse, "description": "An upstream is down"}})
    async def readyz(state: State):
        upstreams = await state.upstreams.readiness()
        if all(upstreams.values()):
            return {"status": "ready", "upstreams": upstreams}
        down = ", ".join(k for k, ok in upstreams.items() if not ok)
        raise APIError(503, f"not ready: {down} unreachable", "upstream_unavailable",
                       headers={"Retry-After": "1"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics"}})
    async def prometheus_metrics():
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("gateway").joinpath("static/index.html").read_text())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    # Outermost first: the request id and metrics see every response, 413s included.
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(RequestContext, metrics=metrics)
    return app
