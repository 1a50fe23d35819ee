"""Who may call the API and how much: Bearer API keys, the request rate per key, and the budgets
of work (sequences and tokens per minute) a request is charged before it reaches the policy."""

from __future__ import annotations

import hashlib
import hmac
import math

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import Counter

from gateway.budgets import Charge, OverBudget, TokenBuckets, TooLarge, WorkBudgets
from gateway.errors import APIError

bearer = HTTPBearer(auto_error=False, description="An API key from the gateway's `api_keys`.")

__all__ = ["Guard", "TokenBuckets", "bearer", "key_id", "tenant_label"]

# The request field that drives each budget's cost, named in a 400 for a request that is larger
# than the whole budget.
_BUDGET_PARAM = {"sequences": "n", "tokens": "max_tokens"}
_BUDGET_SETTING = {"requests": "rate_limit_per_minute", "sequences": "sequences_per_minute",
                   "tokens": "tokens_per_minute"}


def tenant_label(caller: str) -> str:
    """The caller as a metric label: the key id (bounded by the configured keys), or "open" for
    every caller of a gateway without keys (whose ids are client addresses, unbounded)."""
    return caller if caller.startswith("key:") else "open"


def key_id(key: str) -> str:
    """The id a key's caller gets (what `Guard.check` returns for it): never the key itself."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait)))}


class Guard:
    def __init__(self, api_keys: list[str], per_minute: float, burst: int, *,
                 sequences_per_minute: float = 0, tokens_per_minute: float = 0,
                 refusals: Counter | None = None):
        # Keys are compared by digest in constant time; only digests are held.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.buckets = TokenBuckets(per_minute, burst) if per_minute > 0 else None
        self.work = WorkBudgets(sequences_per_minute, tokens_per_minute)
        self.refusals = refusals  # by (tenant, budget)

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
                self._refused(caller, "requests")
                raise APIError(429, f"requests budget exceeded (rate_limit_per_minute); retry "
                                    f"in {wait:.1f} s", "rate_limit_exceeded",
                               headers=_retry_after(wait))
        return caller

    def charge(self, caller: str, sequences: int, tokens: int) -> Charge:
        """Charges a request's work to the caller: `sequences` = prompts x samples drawn,
        `tokens` = estimated prompt tokens + max_tokens per sequence. 429 (with Retry-After)
        while a budget is spent, 400 when the request alone exceeds a whole budget. A call that
        fails upstream keeps its charge: the policy may have done the work before it failed."""
        try:
            return self.work.charge(caller, sequences, tokens)
        except TooLarge as exc:
            setting = _BUDGET_SETTING[exc.budget]
            raise APIError(400, f"this request needs {exc.cost:.0f} {exc.budget}, more than the "
                                f"whole {exc.budget} budget of a key ({setting}={exc.limit:.0f}); "
                                "it could never pass: ask for fewer samples or tokens",
                           "request_exceeds_budget", _BUDGET_PARAM[exc.budget]) from None
        except OverBudget as exc:
            self._refused(caller, exc.budget)
            setting = _BUDGET_SETTING[exc.budget]
            raise APIError(429, f"{exc.budget} budget exceeded ({setting}): this request needs "
                                f"{exc.cost:.0f} {exc.budget}; retry in {exc.retry_after:.1f} s",
                           f"{exc.budget}_budget_exceeded",
                           headers=_retry_after(exc.retry_after)) from None

    def _refused(self, caller: str, budget: str) -> None:
        if self.refusals is not None:
            self.refusals.labels(tenant_label(caller), budget).inc()
