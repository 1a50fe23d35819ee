"""When a client tries a call again: the status codes worth waiting out, and capped exponential
backoff with jitter (pure; the waiting itself is in `rlhf.clients.base`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

# Worth waiting for: the service is down, restarting, overloaded or slow right now. Any other
# code is an answer that asking again will not change.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
})


@dataclass(frozen=True)
class Backoff:
    """Waits of `initial`, 2x, 4x ... seconds, capped at `cap`, each scaled by a random factor in
    [1 - jitter, 1 + jitter] so clients that failed together do not come back together. No wait
    ends later than `max_seconds` after the first attempt (0: never retry)."""

    max_seconds: float = 60.0
    initial: float = 0.25
    cap: float = 10.0
    jitter: float = 0.2

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rng = rng or random.Random()
        delay = self.initial
        while True:
            yield delay * (1 - self.jitter + 2 * self.jitter * rng.random())
            delay = min(delay * 2, self.cap)


NO_RETRY = Backoff(max_seconds=0)
