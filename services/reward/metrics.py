"""Reward metrics, `rlhf_reward_*`. The labels are the scorer's name (a handful per deployment,
fixed by configuration) and the kept reward-model versions (at most rm_keep_versions + 1; a
deleted version's series are removed)."""

from __future__ import annotations

import contextlib

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

        self.rm_pushes = m.counter(
            "rlhf_reward_model_pushes", "PushRewardModel calls by result (ok, refused, failed)",
            ("result",))
        self.rm_active = m.gauge(
            "rlhf_reward_model_active", "1 for the active reward-model version, 0 for other kept "
            "ones", ("version",))
        self.rm_accuracy = m.gauge(
            "rlhf_reward_model_heldout_accuracy", "Held-out accuracy of a kept reward-model "
            "version, as its push reported it", ("version",))
        self._rm_shown: set[str] = set()

    def show_rm_versions(self, accuracy: dict[str, float | None], active: str | None) -> None:
        """Sets the version gauges to the kept versions (accuracy by version) and the active
        one."""
        for gone in self._rm_shown - set(accuracy):
            for gauge in (self.rm_active, self.rm_accuracy):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        for version, value in accuracy.items():
            self.rm_active.labels(version).set(1 if version == active else 0)
            if value is not None:
                self.rm_accuracy.labels(version).set(value)
        self._rm_shown = set(accuracy)

    def batch_observer(self, scorer: str):
        def observe(size: int, waited: float, seconds: float) -> None:
            self.batch_items.labels(scorer).observe(size)
            self.batch_wait.labels(scorer).observe(waited)
            self.batch_seconds.labels(scorer).observe(seconds)

        return observe
