"""The server interceptor every service runs: request id, error mapping, per-RPC metrics.

For each call it takes the caller's `x-request-id` (or makes one), binds it to the logs, sends it
back in the trailing metadata, turns ServiceError into its status code, hides unexpected errors
behind INTERNAL with the request id (logging the traceback), and counts the call by method and
final status code. `rebuild_handler` lets other interceptors (auth.py) swap a handler's
behaviour the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import Callable

import grpc

from rlhf.plumbing.errors import to_status
from rlhf.plumbing.logs import request_id_var
from rlhf.plumbing.metrics import RpcMetrics

log = logging.getLogger("rlhf.rpc")

REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.match(value):
            return value
    return uuid.uuid4().hex


class _Call:
    """Book-keeping of one call: binds the request id and records the outcome once."""

    def __init__(self, metrics: RpcMetrics | None, method: str, details):
        self.metrics = metrics
        self.method = method
        self.request_id = _request_id(details.invocation_metadata)
        self.start = time.perf_counter()
        self.token = None

    def begin(self, context: grpc.aio.ServicerContext) -> None:
        self.token = request_id_var.set(self.request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        if self.metrics:
            self.metrics.in_flight.labels(self.method).inc()

    def end(self, code: grpc.StatusCode) -> None:
        if self.metrics:
            self.metrics.in_flight.labels(self.method).dec()
            self.metrics.requests.labels(self.method, code.name).inc()
            self.metrics.latency.labels(self.method).observe(time.perf_counter() - self.start)
        if self.token is not None:
            request_id_var.reset(self.token)

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException):
        code, message = to_status(exc, self.request_id)
        if code == grpc.StatusCode.INTERNAL:
            log.error("unhandled error in %s", self.method, exc_info=exc)
        else:
            log.info("%s -> %s: %s", self.method, code.name, message)
        self.end(code)
        await context.abort(code, message)


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions report the raw integer
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status
    return grpc.StatusCode.OK


def _wrap_unary_response(behavior: Callable, call_factory):
    async def handler(request_or_iterator, context):
        call = call_factory()
        call.begin(context)
        try:
            response = await behavior(request_or_iterator, context)
        except asyncio.CancelledError:
            call.end(grpc.StatusCode.CANCELLED)
            raise
        except grpc.aio.AbortError:
            call.end(_final_code(context))
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, traceback logged
            await call.fail(context, exc)
        else:
            call.end(_final_code(context))
            return response

    return handler


def _wrap_stream_response(behavior: Callable, call_factory):
    async def handler(request_or_iterator, context):
        call = call_factory()
        call.begin(context)
        try:
            result = behavior(request_or_iterator, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:  # a coroutine that writes with context.write()
                await result
        except asyncio.CancelledError:
            call.end(grpc.StatusCode.CANCELLED)
            raise
        except grpc.aio.AbortError:
            call.end(_final_code(context))
            raise
        except Exception as exc:  # noqa: BLE001
            await call.fail(context, exc)
        else:
            call.end(_final_code(context))

    return handler


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Applies request ids, error mapping and metrics to every RPC but the health and reflection
    services (probes would drown the series)."""

    def __init__(
        self,
        metrics: RpcMetrics | None,
        skip_prefixes=("/grpc.health.", "/grpc.reflection."),
    ):
        self.metrics = metrics
        self.skip_prefixes = tuple(skip_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.skip_prefixes):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def call_factory():
            return _Call(self.metrics, method, handler_call_details)

        def wrap(behavior: Callable, streams_responses: bool) -> Callable:
            wrapper = _wrap_stream_response if streams_responses else _wrap_unary_response
            return wrapper(behavior, call_factory)

        return rebuild_handler(handler, wrap)


def rebuild_handler(handler: grpc.RpcMethodHandler,
                    wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """The same kind of handler (unary/stream request and response) with its behaviour replaced
    by `wrap(behaviour, streams_responses)`; serializers are kept."""
    for kind, factory, streams in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    ):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(
                wrap(behavior, streams),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise ValueError(f"handler has no behaviour: {handler!r}")
