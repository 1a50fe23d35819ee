"""Token auth for a service's control calls: a gRPC server interceptor that guards a set of
methods with a shared admin token, and optionally a second set with a read token; plus the
start-up rule every service with an admin surface follows.

A guarded call must carry the metadata `authorization: Bearer <token>` (the one accepted form).
A missing or malformed header is refused with UNAUTHENTICATED, a wrong token with
PERMISSION_DENIED; tokens are compared in constant time (hmac.compare_digest) and never appear in
a log line or an error message. Admin methods take the admin token only; read methods take the
read token or the admin token (no read token configured: the admin token only). Other methods
pass untouched, so data-plane calls cost nothing. The interceptor knows no service: it is given
the tokens and the full method names it guards, e.g.
`AdminAuthInterceptor(token, {"/rlhf.v1.PolicyService/PushAdapter"})`, and works whatever kind
of call the method is (unary or streaming, either way).

A refused call ends in the interceptor with `context.abort`; the handler never runs and a
request stream is never read.

`require_admin_token` is the start-up rule: a service with an admin surface and no admin token
refuses to start (ConfigError) unless it was started with `--insecure-no-auth`, which is logged
as a warning on every start.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from rlhf.plumbing.config import ConfigError
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
    """Refuses calls to `methods` (full names, "/package.Service/Method") that lack the admin
    token, and calls to `read_methods` that carry neither the read token nor the admin token."""

    def __init__(self, token: str, methods: Iterable[str], *, read_token: str | None = None,
                 read_methods: Iterable[str] = ()):
        if not token:
            raise ValueError("AdminAuthInterceptor needs a non-empty token")
        self._token = token.encode()
        self._read_token = read_token.encode() if read_token else None
        self.methods = frozenset(methods)
        self.read_methods = frozenset(read_methods) - self.methods
        bad = [m for m in self.methods | self.read_methods
               if not m.startswith("/") or m.count("/") != 2]
        if bad:
            raise ValueError(f"method names must look like '/package.Service/Method': {bad}")

    def check(self, metadata, read: bool = False) -> tuple[grpc.StatusCode, str] | None:
        """None when the metadata carries a token good for the call (`read`: a read method),
        else the refusal."""
        kind = "read or admin" if read and self._read_token else "admin"
        header_present = any(key == AUTH_HEADER for key, _ in metadata or ())
        given = bearer_token(metadata)
        if given is None:
            if header_present:
                return (grpc.StatusCode.UNAUTHENTICATED,
                        f"the authorization metadata is malformed: send the {kind} token as "
                        "'authorization: Bearer <token>'")
            what = "a read call" if kind != "admin" else "an admin call"
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"this is {what}: send the {kind} token as 'authorization: Bearer <token>' "
                    "metadata")
        given_bytes = given.encode()
        # Both comparisons always run, so the time taken says nothing about which token matched.
        is_admin = hmac.compare_digest(given_bytes, self._token)
        is_reader = (self._read_token is not None
                     and hmac.compare_digest(given_bytes, self._read_token))
        if is_admin or (read and is_reader):
            return None
        if is_reader:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    "the read token cannot make this call: it needs the admin token")
        return grpc.StatusCode.PERMISSION_DENIED, f"the {kind} token is wrong"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (method not in self.methods and method not in self.read_methods):
            return handler
        refusal = self.check(handler_call_details.invocation_metadata,
                             read=method in self.read_methods)
        if refusal is None:
            return handler
        code, message = refusal
        log.info("%s refused: %s", method, code.name)
        return rebuild_handler(handler, lambda _behavior, _streams: _refuse(code, message))


def require_admin_token(service: str, token: str | None, insecure_no_auth: bool,
                        env_var: str) -> None:
    """The start-up rule of a service with an admin surface: without an admin token it starts
    only when told `insecure_no_auth`, and then says loudly that its admin calls are open."""
    if token:
        return
    if not insecure_no_auth:
        raise ConfigError(
            f"the {service} has no admin token: set {env_var} (or {env_var}_FILE, a file "
            f"holding it), or start it with --insecure-no-auth to leave its admin calls open "
            "to anyone who reaches its port")
    log.warning("INSECURE: the %s runs with --insecure-no-auth: anyone who reaches its port "
                "can make its admin calls. Set %s for anything but a throwaway test.",
                service, env_var)


def token_from(value: str | None, path: Path | None, what: str) -> str | None:
    """A configured token: given as is, else read from `path` (a mounted Secret), else None."""
    if value:
        return value
    return read_token_file(path, what) if path is not None else None


def read_token_file(path: Path, what: str) -> str:
    """A token kept in a file: its text without surrounding whitespace."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} from {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{what} file {path} is empty")
    return token


def _refuse(code: grpc.StatusCode, message: str) -> Callable:
    async def refuse(_request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    return refuse
