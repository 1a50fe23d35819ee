"""Who may call the API and how often: Bearer API keys and a token bucket per key."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.errors import APIError

bearer = HTTPBearer(auto_error=False, description="An API key from the gateway's `api_keys`.")


class TokenBuckets:
    """`rate` tokens per second up to `burst`, one bucket per caller. Pure and clock-injected so
    the arithmetic is testable; the gateway keeps at most `max_keys` buckets (oldest dropped)."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000,
                 clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the call may go ahead, else the seconds to wait before retrying."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                wait, tokens = 0.0, tokens - 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[key] = (tokens, now)  # re-inserted: dict order = least recently used
            while len(self._buckets) > self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            return wait


class Guard:
    def __init__(self, api_keys: list[str], per_minute: float, burst: int):
        # Keys are compared by digest in constant time; only digests are held.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.buckets = TokenBuckets(per_minute, burst) if per_minute > 0 else None

    @property
    def open(self) -> bool:
        return not self._digests

    def _key_id(self, credentials: HTTPAuthorizationCredentials | None) -> str:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(credentials.credentials.encode()).digest()
        if not any(hmac.compare_digest(digest, d) for d in self._digests):
            raise APIError(401, "invalid API key", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return "key:" + digest.hex()[:16]

    def check(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
        caller = ("ip:" + (request.client.host if request.client else "-")) if self.open \
            else self._key_id(credentials)
        if self.buckets is not None:
            wait = self.buckets.take(caller)
            if wait > 0:
                raise APIError(429, f"rate limit exceeded; retry in {wait:.1f} s",
                               "rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return caller
