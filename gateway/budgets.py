"""Per-caller budgets: a token bucket per caller for the request rate, and budgets of work
(sequences and tokens per minute) that a request is charged before the policy sees it.

Pure and clock-injected, so the arithmetic is testable; the HTTP side (status codes, metrics)
is gateway/guard.py. A work budget holds one minute of its rate: a caller may spend a minute's
worth at once and then waits for it to refill, and one request costing more than a minute's
worth could never pass (the guard answers 400, not 429)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

# Up-front guess of a text's tokens before the policy tokenizes it: BPE vocabularies of chat
# models average about four UTF-8 bytes per token on prose. The charge is corrected with the
# policy's own count once the answer is back (`Charge.settle`).
BYTES_PER_TOKEN = 4


def text_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


class TokenBuckets:
    """`per_minute / 60` units per second up to `burst`, one bucket per caller; the gateway keeps
    at most `max_keys` buckets (least recently used dropped). A bucket may go below zero when a
    settled charge turns out larger than its estimate: the caller then waits off the debt."""

    def __init__(self, per_minute: float, burst: float, max_keys: int = 100_000,
                 clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _level(self, key: str, now: float) -> float:
        level, last = self._buckets.pop(key, (self.burst, now))
        return min(self.burst, level + (now - last) * self.rate)

    def _store(self, key: str, level: float, now: float) -> None:
        self._buckets[key] = (level, now)  # re-inserted: dict order = least recently used
        while len(self._buckets) > self.max_keys:
            self._buckets.pop(next(iter(self._buckets)))

    def wait(self, key: str, cost: float = 1.0) -> float:
        """Seconds until `cost` fits in the caller's bucket (0: it fits now); takes nothing."""
        now = self.clock()
        with self._lock:
            level = self._level(key, now)
            self._store(key, level, now)
            return 0.0 if level >= cost else (cost - level) / self.rate

    def take(self, key: str, cost: float = 1.0) -> float:
        """Takes `cost` and returns 0 when it fits, else takes nothing and returns the seconds
        to wait before retrying."""
        now = self.clock()
        with self._lock:
            level = self._level(key, now)
            if level >= cost:
                wait, level = 0.0, level - cost
            else:
                wait = (cost - level) / self.rate
            self._store(key, level, now)
            return wait

    def give(self, key: str, amount: float) -> None:
        """Returns `amount` to the caller's bucket (up to `burst`); a negative amount charges
        more, possibly below zero."""
        now = self.clock()
        with self._lock:
            self._store(key, min(self.burst, self._level(key, now) + amount), now)


@dataclass(frozen=True)
class OverBudget(Exception):
    """The caller has spent `budget` for now: retry in `retry_after` seconds."""
    budget: str
    cost: float
    retry_after: float


@dataclass(frozen=True)
class TooLarge(Exception):
    """One request costs more than the whole of `budget`: it could never pass."""
    budget: str
    cost: float
    limit: float


class Charge:
    """What one request was charged; `settle` corrects the token charge to the tokens used."""

    def __init__(self, budgets: WorkBudgets | None, key: str, costs: Mapping[str, float]):
        self.budgets, self.key, self.costs = budgets, key, dict(costs)
        self.settled = False

    def settle(self, tokens_used: int) -> None:
        """Refunds the unused part of the token charge (the estimate of the prompt and the
        max_tokens not generated), or charges the excess when the prompt had more tokens than
        estimated. Once per charge."""
        if self.settled or self.budgets is None:
            return
        self.settled = True
        bucket = self.budgets.buckets.get("tokens")
        if bucket is not None:
            bucket.give(self.key, self.costs["tokens"] - tokens_used)


class WorkBudgets:
    """The `sequences` and `tokens` budgets per caller (a limit of 0 turns one off). A request
    is charged on every budget or on none."""

    def __init__(self, sequences_per_minute: float, tokens_per_minute: float,
                 max_keys: int = 100_000, clock=time.monotonic):
        self.limits = {name: float(limit) for name, limit in
                       (("sequences", sequences_per_minute), ("tokens", tokens_per_minute))
                       if limit > 0}
        self.buckets = {name: TokenBuckets(limit, limit, max_keys, clock)
                        for name, limit in self.limits.items()}
        self._lock = threading.Lock()

    def charge(self, key: str, sequences: int, tokens: int) -> Charge:
        """Charges a request of `sequences` sequences and `tokens` tokens (prompt estimate plus
        max_tokens per sequence); raises TooLarge or OverBudget (naming the budget that needs the
        longest wait) and then charges nothing."""
        costs = {"sequences": float(sequences), "tokens": float(tokens)}
        for name, limit in self.limits.items():
            if costs[name] > limit:
                raise TooLarge(name, costs[name], limit)
        with self._lock:
            waits = {name: bucket.wait(key, costs[name]) for name, bucket in self.buckets.items()}
            worst = max(waits, key=waits.get, default=None)
            if worst is not None and waits[worst] > 0:
                raise OverBudget(worst, costs[worst], waits[worst])
            for name, bucket in self.buckets.items():
                bucket.take(key, costs[name])
        return Charge(self if self.buckets else None, key, costs)
