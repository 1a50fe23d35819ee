"""Bounds every gRPC server holds to, whoever its clients are.

- Transport options (`server_options`): request size, HTTP/2 streams per connection, keepalive
  enforcement that admits our own clients' pings (rlhf.plumbing.channel pings every 30 s while
  a call runs), and a maximum connection age after which clients reconnect.
- `LimitsInterceptor`: at most `max_concurrent_rpcs` calls at once (health and reflection
  exempt, so probes answer when the service is busy), a maximum duration per call, and, for
  calls that stream responses, a bound on how long one message may wait for the client to take
  it. A client that stops reading therefore cannot hold what its call holds (admission, an
  adapter lease) for longer than that bound.
- `abort_call`: ends another task's call with a status of the service's choosing (used where a
  call must give way, e.g. to an adapter switch).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from rlhf.plumbing.errors import DeadlineExceeded, ResourceExhausted, ServiceError
from rlhf.plumbing.interceptors import rebuild_handler

log = logging.getLogger("rlhf.limits")

EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# grpc's own cap on calls sits this far above ours: the health and reflection calls we exempt
# still fit, and a call refused by us gets our message rather than grpc's.
PROBE_HEADROOM = 32


@dataclass(frozen=True)
class ServerLimits:
    """What a server bounds; `ServiceConfig.server_limits()` builds it from the config."""

    max_receive_bytes: int
    max_send_bytes: int
    max_concurrent_rpcs: int
    max_streams_per_connection: int
    keepalive_min_interval_seconds: float
    keepalive_permit_without_calls: bool
    max_connection_age_seconds: float
    max_connection_age_grace_seconds: float
    max_call_seconds: float
    max_stream_seconds: float
    stream_send_timeout_seconds: float


def server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    """grpc.aio.server options that carry the transport bounds."""
    return [
        ("grpc.max_receive_message_length", limits.max_receive_bytes),
        ("grpc.max_send_message_length", limits.max_send_bytes),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        # A ping sooner than this after the last one (with no data between) is a strike; two
        # strikes and the connection is closed (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms",
         _ms(limits.keepalive_min_interval_seconds)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", int(limits.keepalive_permit_without_calls)),
        ("grpc.max_connection_age_ms", _ms(limits.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(limits.max_connection_age_grace_seconds)),
    ]


def _ms(seconds: float) -> int:
    return min(int(seconds * 1000), 2**31 - 1)  # grpc reads these as 32-bit integers


# Calls ended on purpose by abort_call: the error their task is to end with.
_aborts: weakref.WeakKeyDictionary[asyncio.Task, ServiceError] = weakref.WeakKeyDictionary()


def abort_call(task: asyncio.Task | None, error: ServiceError) -> None:
    """Ends the call that runs in `task` with `error`'s status and message (the task is
    cancelled; the LimitsInterceptor turns that cancellation into the error). The call's own
    clean-up (finally blocks, context managers) runs as for any cancellation."""
    if task is None or task.done():
        return
    _aborts.setdefault(task, error)
    task.cancel()


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Concurrency, duration and slow-reader bounds for every call but health and reflection.
    Install it after the ServiceInterceptor, so its refusals are counted and mapped there."""

    def __init__(self, limits: ServerLimits, exempt_prefixes=EXEMPT_PREFIXES):
        self.limits = limits
        self.exempt_prefixes = tuple(exempt_prefixes)
        self.in_flight = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.exempt_prefixes):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def wrap(behavior: Callable, streams_responses: bool) -> Callable:
            if streams_responses:
                return self._stream_handler(method, behavior)
            return self._unary_handler(method, behavior)

        return rebuild_handler(handler, wrap)

    def _admit(self, method: str) -> None:
        if self.in_flight >= self.limits.max_concurrent_rpcs:
            raise ResourceExhausted(
                f"this server is running its limit of {self.limits.max_concurrent_rpcs} calls "
                f"(max_concurrent_rpcs); {method} refused, retry with backoff"
            )
        self.in_flight += 1

    def _unary_handler(self, method: str, behavior: Callable) -> Callable:
        seconds = self.limits.max_call_seconds

        async def handler(request_or_iterator, context):
            self._admit(method)
            try:
                async with _bounded(method, seconds, "max_call_seconds"):
                    return await behavior(request_or_iterator, context)
            finally:
                self.in_flight -= 1

        return handler

    def _stream_handler(self, method: str, behavior: Callable) -> Callable:
        seconds = self.limits.max_stream_seconds
        send_timeout = self.limits.stream_send_timeout_seconds

        async def handler(request_or_iterator, context):
            # A coroutine that writes each message itself, so that each write can be bounded.
            self._admit(method)
            responses = behavior(request_or_iterator, context)
            stalled: asyncio.Future | None = None
            write: asyncio.Future | None = None
            try:
                async with _bounded(method, seconds, "max_stream_seconds"):
                    if not hasattr(responses, "__aiter__"):  # a coroutine using context.write
                        await responses
                        return
                    async for message in responses:
                        write = asyncio.ensure_future(context.write(message))
                        done, _ = await asyncio.wait((write,), timeout=send_timeout)
                        if not done:
                            stalled = write
                            break
                        write.result()
            finally:
                self.in_flight -= 1
                if write is not None and stalled is None:
                    write.cancel()
                aclose = getattr(responses, "aclose", None)
                if aclose is not None:
                    # Runs the servicer's own clean-up now (admission, leases), not when the
                    # generator is garbage-collected.
                    await aclose()
            if stalled is not None:
                log.warning("%s: the client took no message for %g s "
                            "(stream_send_timeout_seconds); the call is ended", method,
                            send_timeout)
                # grpc sends no status while a message waits for the client's flow control: if
                # the client reads again it gets the status; if not, the call ends with its
                # deadline or its connection (max_connection_age_seconds + grace).
                await stalled
                raise DeadlineExceeded(
                    f"{method}: the client took no message for {send_timeout:g} s "
                    "(stream_send_timeout_seconds); the call is ended"
                )

        return handler


class _bounded:
    """`async with`: the block runs at most `seconds`; an abort_call on this task ends it with
    the aborting error."""

    def __init__(self, method: str, seconds: float, key: str):
        self.method, self.seconds, self.key = method, seconds, key
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self):
        self._timeout = asyncio.timeout(self.seconds if self.seconds > 0 else None)
        await self._timeout.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc, tb):
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.method} ran past this server's limit of {self.seconds:g} s ({self.key})"
            ) from None
        if exc_type is asyncio.CancelledError:  # not the timeout's: a client's, or abort_call's
            task = asyncio.current_task()
            error = _aborts.pop(task, None) if task is not None else None
            if error is not None:
                task.uncancel()
                raise error from None
        return False
