"""Bounded admission: the sequences (prompts x n) in flight on a replica. Beyond the bound a call
is refused at once with RESOURCE_EXHAUSTED rather than queued without limit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rlhf.plumbing.errors import ResourceExhausted
from services.policy.stats import EngineStats


class Admission:
    def __init__(self, limit: int, stats: EngineStats):
        self.limit = limit
        self.pending = 0
        self.stats = stats

    @contextlib.contextmanager
    def admit(self, sequences: int) -> Iterator[None]:
        """Holds `sequences` of the bound for the block; raises when they don't fit."""
        if self.pending + sequences > self.limit:
            self.stats.rejected.inc()
            raise ResourceExhausted(
                f"policy is at its admission limit: {self.pending} sequences in flight, this call "
                f"adds {sequences}, limit {self.limit} (max_pending_sequences); retry with backoff"
            )
        self._add(sequences)
        try:
            yield
        finally:
            self._add(-sequences)

    def _add(self, sequences: int) -> None:
        self.pending += sequences
        self.stats.pending.set(self.pending)
