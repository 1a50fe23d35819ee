"""Token auth for a service's control calls: a gRPC server interceptor that guards a set of
methods with one shared admin token.

A guarded call must carry the metadata `authorization: Bearer <token>` (the one accepted form).
A missing or malformed header is refused with UNAUTHENTICATED, a wrong token with
PERMISSION_DENIED; tokens are compared in constant time (hmac.compare_digest). Other methods pass
untouched, so reads and data-plane calls cost nothing. The interceptor knows no service: it is
given the token and the full method names it guards, e.g.
`AdminAuthInterceptor(token, {"/rlhf.v1.PolicyService/PushAdapter"})`, and works whatever kind
of call the method is (unary or streaming, either way).

A refused call ends in the interceptor with `context.abort`; the handler never runs and a
request stream is never read.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable

import grpc

from rlhf.plumbing.interceptors import rebuild_handler

log = logging.getLogger("rlhf.auth")

AUTH_HEADER = "authorization"
SCHEME = "bearer"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token` the way AdminAuthInterceptor reads it."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


def bearer_token(metadata) -> str | None:
    """The token of the first `authorization` entry, or None when there is no such entry or it is
    not `Bearer <token>` (the scheme is case-insensitive, as in RFC 6750)."""
    for key, value in metadata or ():
        if key != AUTH_HEADER:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        return token if scheme.lower() == SCHEME and token else None
    return None


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to `methods` (full names, "/package.Service/Method") that lack the token."""

    def __init__(self, token: str, methods: Iterable[str]):
        if not token:
            raise ValueError("AdminAuthInterceptor needs a non-empty token")
        self._token = token.encode()
        self.methods = frozenset(methods)
        bad = [m for m in self.methods if not m.startswith("/") or m.count("/") != 2]
        if bad:
            raise ValueError(f"method names must look like '/package.Service/Method': {bad}")

    def check(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None when the metadata carries the right token, else the refusal."""
        header_present = any(key == AUTH_HEADER for key, _ in metadata or ())
        given = bearer_token(metadata)
        if given is None:
            if header_present:
                return (grpc.StatusCode.UNAUTHENTICATED,
                        "the authorization metadata is malformed: send the admin token as "
                        "'authorization: Bearer <token>'")
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "this is an admin call: send the admin token as 'authorization: Bearer "
                    "<token>' metadata")
        if not hmac.compare_digest(given.encode(), self._token):
            return grpc.StatusCode.PERMISSION_DENIED, "the admin token is wrong"
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self.methods:
            return handler
        refusal = self.check(handler_call_details.invocation_metadata)
        if refusal is None:
            return handler
        code, message = refusal
        log.info("%s refused: %s", method, code.name)
        return rebuild_handler(handler, lambda _behavior, _streams: _refuse(code, message))


def _refuse(code: grpc.StatusCode, message: str) -> Callable:
    async def refuse(_request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    return refuse
