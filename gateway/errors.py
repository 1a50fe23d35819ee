"""Every error the gateway returns is JSON in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises its own typed
exceptions with our message. Stack traces go to the log only."""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.clients import CallFailed

log = logging.getLogger("rlhf.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status,
                        headers=headers)


# How an upstream gRPC status reaches the HTTP caller. Auth failures upstream are the gateway's
# misconfiguration, not the caller's, hence 502; an overloaded replica is a 503 to retry later.
_UPSTREAM = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "upstream_not_ready"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "upstream_overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "upstream_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "upstream_timeout"),
}


def from_upstream(service: str, err: CallFailed) -> APIError:
    status, code = _UPSTREAM.get(err.code, (502, "upstream_error"))
    if service == "policy" and err.code == grpc.StatusCode.FAILED_PRECONDITION:
        # The policy can't serve what was asked in its current state (a merged-mode replica
        # asked for the base model): the request conflicts with the server's state.
        status, code = 409, "model_unavailable"
    detail = err.details or err.code.name
    if status == 504:
        message = f"the {service} service did not answer in time ({detail})"
    elif status == 503:
        message = f"the {service} service is unavailable: {detail}"
    elif status == 502:
        message = f"the {service} service failed: {err.code.name}: {detail}"
    else:
        message = detail
    headers = {"Retry-After": "1"} if status == 503 else None
    return APIError(status, message, code, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "parse error")
            return f"the body is not valid JSON ({detail})", None
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, None, None, exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "-")
        log.exception("unhandled error (request id %s)", rid)
        return error_response(500, f"internal error (request id {rid}); see gateway log",
                              "internal_error")
