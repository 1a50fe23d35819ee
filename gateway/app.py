"""The FastAPI app: routes, middleware, error shape, and the lifespan that opens the gRPC
channels and the feedback store (nothing connects at import)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway import api_best_of_n, api_feedback, api_openai, errors
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.feedback import DuplicateAnswer, FeedbackStore
from gateway.guard import Guard
from gateway.metrics import GatewayMetrics
from gateway.middleware import BodyLimit, RequestContext
from gateway.schemas import ErrorResponse
from gateway.state import GatewayState, State
from gateway.upstream import Upstreams
from rlhf import __version__

log = logging.getLogger("rlhf.gateway")

# Documented on every route, so clients (and schemathesis) know each status we may answer.
_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in {
    400: "Invalid parameters", 401: "Missing or invalid API key", 404: "Unknown model or id",
    409: "Request id already used, or the policy can't serve that model as configured",
    413: "Body too large", 429: "Rate limited (see Retry-After)",
    500: "Internal error", 502: "Upstream failed", 503: "Upstream unavailable or overloaded",
    504: "Upstream timed out"}.items()}


def create_app(config: GatewayConfig) -> FastAPI:
    metrics = GatewayMetrics.create()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not config.api_keys:
            log.warning("no api_keys configured: the gateway is open to anyone who can reach it")
        upstreams = Upstreams(config, metrics)
        await upstreams.open()
        store = FeedbackStore(config.feedback_url())
        app.state.gateway = GatewayState(
            config=config, metrics=metrics,
            guard=Guard(config.api_keys, config.rate_limit_per_minute, config.rate_limit_burst),
            upstreams=upstreams, store=store)
        try:
            yield
        finally:
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

    for module in (api_best_of_n, api_openai, api_feedback):
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
