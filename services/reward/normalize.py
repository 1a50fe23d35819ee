"""Running normalisation of a scorer's output: (x - mean) / std over everything it has scored.

A learned reward model's scale and offset are arbitrary (Bradley-Terry only fixes differences),
so PPO's value targets and the KL coefficient behave better on a standardised reward. The
statistics are Welford's running ones; a call's own scores count before it is normalised, so
the first call is centred too. They can freeze after N items: from then on the same input gets
the same score again.
"""

from __future__ import annotations

import math


class RunningNorm:
    def __init__(self, freeze_after: int = 0, eps: float = 1e-6):
        self.freeze_after = freeze_after
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    @property
    def frozen(self) -> bool:
        return self.freeze_after > 0 and self.count >= self.freeze_after

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / self.count) if self.count else 0.0

    def update(self, values: list[float]) -> None:
        for x in values:
            if self.frozen:
                return
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self._m2 += delta * (x - self.mean)

    def apply(self, values: list[float]) -> list[float]:
        # A constant stream has std 0: centre it and leave the scale alone.
        scale = self.std if self.std > self.eps else 1.0
        return [(x - self.mean) / scale for x in values]

    def __call__(self, values: list[float]) -> list[float]:
        self.update(values)
        return self.apply(values)
