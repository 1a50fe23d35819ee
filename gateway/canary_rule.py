"""The canary's decision rule, pure math: is a staged version not worse than the active one?

Promote when, on the answers of each arm (one observation per request: the mean reward of its
scored completions):
- reward: a one-sided Welch t-test of non-inferiority rejects "candidate mean <= incumbent mean -
  margin" at level alpha, the margin being `margin_sd` standard deviations of the incumbent's
  rewards (scale-free: reward models differ in scale);
- errors: the candidate's error rate is at most the incumbent's + `max_error_increase`;
- latency: the candidate's mean latency is at most `max_latency_ratio` times the incumbent's.
Every failed condition is a reason to roll back. The verdict is due once both arms have
`min_requests` scored answers, or at the deadline with whatever they have (too few answers to
show non-inferiority is a rollback: production traffic never proves a version by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import fmean, variance


@dataclass
class ArmStats:
    """What one arm (incumbent or candidate) did during a canary."""

    requests: int = 0  # answered or failed
    errors: int = 0
    latency_sum: float = 0.0
    rewards: list[float] = field(default_factory=list)

    def record(self, ok: bool, seconds: float) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.latency_sum += seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_latency(self) -> float:
        return self.latency_sum / self.requests if self.requests else 0.0

    @property
    def mean_reward(self) -> float:
        return fmean(self.rewards) if self.rewards else math.nan

    def figures(self) -> dict:
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": round(self.error_rate, 4),
                "mean_latency_s": round(self.mean_latency, 4), "scored": len(self.rewards),
                "mean_reward": None if not self.rewards else round(self.mean_reward, 4)}


@dataclass(frozen=True)
class Rule:
    min_requests: int = 200
    margin_sd: float = 0.2
    alpha: float = 0.05
    max_error_increase: float = 0.01
    max_latency_ratio: float = 1.5


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: list[str]  # why not, when promote is False
    figures: dict


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only on one side of the mean of the beta law.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def welch_noninferiority(candidate: list[float], incumbent: list[float],
                         margin: float) -> tuple[float, float, float]:
    """(t, df, p) of the one-sided Welch test of H0: mean(candidate) - mean(incumbent) <= -margin.
    A small p says the candidate is not worse than the incumbent by the margin or more. Each arm
    needs at least 2 values."""
    nc, ni = len(candidate), len(incumbent)
    vc, vi = variance(candidate) / nc, variance(incumbent) / ni
    diff = fmean(candidate) - fmean(incumbent) + margin
    se2 = vc + vi
    if se2 == 0.0:
        # No spread at all: the difference is exact.
        return (math.inf if diff >= 0 else -math.inf), float(nc + ni - 2), (
            0.0 if diff >= 0 else 1.0)
    t = diff / math.sqrt(se2)
    df = se2 * se2 / ((vc * vc / (nc - 1) if vc else 0.0) + (vi * vi / (ni - 1) if vi else 0.0))
    return t, df, t_sf(t, df)


def due(candidate: ArmStats, incumbent: ArmStats, rule: Rule) -> bool:
    """Both arms have the scored answers the rule asks for."""
    return min(len(candidate.rewards), len(incumbent.rewards)) >= rule.min_requests


def judge(candidate: ArmStats, incumbent: ArmStats, rule: Rule) -> Verdict:
    figures = {"candidate": candidate.figures(), "incumbent": incumbent.figures(),
               "rule": {"min_requests": rule.min_requests, "margin_sd": rule.margin_sd,
                        "alpha": rule.alpha, "max_error_increase": rule.max_error_increase,
                        "max_latency_ratio": rule.max_latency_ratio}}
    reasons = []
    if min(len(candidate.rewards), len(incumbent.rewards)) < 2:
        reasons.append(f"too few scored answers to compare ({len(candidate.rewards)} candidate, "
                       f"{len(incumbent.rewards)} incumbent)")
    else:
        sd = math.sqrt(variance(incumbent.rewards))
        margin = rule.margin_sd * sd
        t, df, p = welch_noninferiority(candidate.rewards, incumbent.rewards, margin)
        figures["reward_test"] = {"margin": round(margin, 6), "t": round(t, 4),
                                  "df": round(df, 2), "p": round(p, 6)}
        if not p < rule.alpha:
            reasons.append(
                f"reward not shown non-inferior: candidate mean {candidate.mean_reward:.4g} vs "
                f"incumbent {incumbent.mean_reward:.4g}, margin {margin:.4g}, p={p:.4g} >= "
                f"alpha {rule.alpha}")
    if candidate.error_rate > incumbent.error_rate + rule.max_error_increase:
        reasons.append(f"error rate {candidate.error_rate:.2%} vs incumbent "
                       f"{incumbent.error_rate:.2%} (allowed +{rule.max_error_increase:.2%})")
    if (candidate.requests and incumbent.requests
            and candidate.mean_latency > rule.max_latency_ratio * incumbent.mean_latency):
        reasons.append(f"mean latency {candidate.mean_latency:.3g} s vs incumbent "
                       f"{incumbent.mean_latency:.3g} s (allowed x{rule.max_latency_ratio})")
    return Verdict(not reasons, reasons, figures)
