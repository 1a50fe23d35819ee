"""ASGI middleware: request id, access metrics and log, and the body size limit.

Pure ASGI (not BaseHTTPMiddleware) so server-sent event streams pass through unbuffered and the
latency of a stream is measured to its last byte."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from gateway.errors import error_body
from gateway.metrics import GatewayMetrics
from rlhf.plumbing.logs import request_id_var

log = logging.getLogger("rlhf.gateway.access")

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for bodies over `limit` bytes, whether announced by Content-Length or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = f"request body is larger than {self.limit} bytes"
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(send, 413, too_big, "request_too_large")
        # Read the body up front (bounded): JSON bodies are small, and it lets us refuse
        # chunked uploads that grow past the limit before the app sees them.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_error(send, 413, too_big, "request_too_large")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestContext:
    """Assigns the request id (a well-formed incoming X-Request-ID is kept), returns it in a
    header, and records the route's count and latency."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_wrapped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(template, str(status)).inc()
            self.metrics.latency.labels(template).observe(elapsed)
            log.info("%s %s %d %.1fms", scope.get("method"), template, status, elapsed * 1000)
            request_id_var.reset(token)
