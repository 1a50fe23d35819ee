"""Reward metrics, `rlhf_reward_*`. The only label is the scorer's name: a handful per
deployment, fixed by configuration."""

from __future__ import annotations

from rlhf.plumbing import metrics as m

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SCORE_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 5, 10)


class RewardStats:
    def __init__(self) -> None:
        self.calls = m.counter(
            "rlhf_reward_score_calls", "Score calls by result (ok, invalid, error)", ("result",)
        )
        self.items = m.counter("rlhf_reward_items", "Items scored by successful Score calls")
        self.call_seconds = m.histogram(
            "rlhf_reward_score_duration_seconds", "Score call latency inside the servicer"
        )
        self.scorer_seconds = m.histogram(
            "rlhf_reward_scorer_duration_seconds", "Time one scorer took for one call", ("scorer",)
        )
        self.scores = m.histogram(
            "rlhf_reward_scorer_score", "Scorer outputs, before normalisation", ("scorer",),
            buckets=SCORE_BUCKETS,
        )
        self.errors = m.counter(
            "rlhf_reward_scorer_errors", "Calls a scorer failed (raised, wrong length, NaN)",
            ("scorer",),
        )
        self.batch_items = m.histogram(
            "rlhf_reward_batch_size_items", "Items per reward-model forward pass", ("scorer",),
            buckets=BATCH_BUCKETS,
        )
        self.batch_wait = m.histogram(
            "rlhf_reward_batch_wait_seconds", "How long a batch's oldest item waited",
            ("scorer",), buckets=WAIT_BUCKETS,
        )
        self.batch_seconds = m.histogram(
            "rlhf_reward_batch_duration_seconds", "Reward-model time per batch (tokenize, forward)",
            ("scorer",), buckets=WAIT_BUCKETS,
        )

    def batch_observer(self, scorer: str):
        def observe(size: int, waited: float, seconds: float) -> None:
            self.batch_items.labels(scorer).observe(size)
            self.batch_wait.labels(scorer).observe(waited)
            self.batch_seconds.labels(scorer).observe(seconds)

        return observe
