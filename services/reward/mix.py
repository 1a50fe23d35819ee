"""The weighted sum: runs every scorer on a call's items (concurrently), checks what each
returned, normalises where configured, and adds up weight * score per item.

A versioned scorer (`rm:@active`) also says which version produced a call's scores; its
normalisation statistics are kept per version, so a new version starts them afresh (a new
reward model's scale and offset owe nothing to the previous one's).

A scorer that raises, returns the wrong number of scores, or a non-finite one fails the call
with INTERNAL and a message naming the scorer, as does a weighted sum that overflows; nothing is
cached or poisoned, so the next call runs normally.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import grpc

from rlhf.plumbing.errors import InvalidArgument, ServiceError
from rlhf.plumbing.logs import current_request_id
from services.reward.items import Item
from services.reward.metrics import RewardStats
from services.reward.normalize import RunningNorm
from services.reward.scorers import Scorer


class ScorerFailed(ServiceError):
    """A configured scorer misbehaved: the server's problem, not the caller's. The message
    carries the request id, which finds the traceback in the server log."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(f"{message} (request id {current_request_id()})")


@dataclass(frozen=True)
class Scored:
    total: float
    parts: tuple[float, ...]  # one per scorer, in configuration order
    versions: tuple[str, ...] = ()  # per scorer: the model version ("" when not versioned)


def check_scores(name: str, raw, n: int) -> list[float]:
    if raw is None or isinstance(raw, str | bytes | dict):
        raise ScorerFailed(f"scorer {name} returned {type(raw).__name__}, not a list of numbers")
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError) as exc:
        raise ScorerFailed(f"scorer {name} returned something other than numbers: {exc}") from None
    if len(values) != n:
        raise ScorerFailed(f"scorer {name} returned {len(values)} scores for {n} items")
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ScorerFailed(f"scorer {name} returned {value} for item {i}")
    return values


def weighted_sum(weights: list[float], parts: tuple[float, ...], item: int) -> float:
    """sum(weight * part), or ScorerFailed when it is not a finite number (finite scores times
    finite weights can still overflow to inf, which no trainer can learn from)."""
    try:
        total = math.fsum(w * p for w, p in zip(weights, parts, strict=True))
    except (OverflowError, ValueError):  # fsum refuses inf - inf
        total = math.nan
    if not math.isfinite(total):
        scores, factors = ", ".join(map(repr, parts)), ", ".join(map(repr, weights))
        raise ScorerFailed(f"the weighted sum of item {item}'s scores ({scores}) with weights "
                           f"({factors}) overflows; lower the weights or bound the scorers' "
                           "outputs")
    return total


class Mix:
    def __init__(self, scorers: list[Scorer], norms: dict[str, RunningNorm], stats: RewardStats):
        self.scorers = scorers
        self.norms = norms  # by scorer name: the statistics of its unversioned output
        self.stats = stats
        self._version_norms: dict[tuple[str, str], RunningNorm] = {}

    def norm_for(self, name: str, version: str) -> RunningNorm | None:
        """The statistics that normalise `name`'s output from model `version`, or None."""
        base = self.norms.get(name)
        if base is None or not version:
            return base
        key = (name, version)
        norm = self._version_norms.get(key)
        if norm is None:
            norm = self._version_norms[key] = RunningNorm(base.freeze_after, base.eps)
            # Two per scorer: calls still running on the previous version during a switch
            # keep theirs; older ones are done with.
            for old in [k for k in self._version_norms if k[0] == name][:-2]:
                del self._version_norms[old]
        return norm

    async def score(self, items: list[Item]) -> list[Scored]:
        results = await asyncio.gather(
            *(self._run(s, items) for s in self.scorers), return_exceptions=True
        )
        for result in results:  # the first failure in configuration order decides the status
            if isinstance(result, BaseException):
                raise result
        columns, versions = [], []
        for scorer, (values, version) in zip(self.scorers, results, strict=True):
            norm = self.norm_for(scorer.name, version)
            columns.append(norm(values) if norm is not None else values)
            versions.append(version)
        weights = [s.weight for s in self.scorers]
        out = []
        for i, parts in enumerate(zip(*columns, strict=True)):
            out.append(Scored(weighted_sum(weights, parts, i), tuple(parts), tuple(versions)))
        return out

    async def _run(self, scorer: Scorer, items: list[Item]) -> tuple[list[float], str]:
        start = time.perf_counter()
        try:
            raw, version = await scorer.run(items)
            values = check_scores(scorer.name, raw, len(items))
        except InvalidArgument:
            raise  # the caller's input, not a scorer fault
        except ServiceError:
            self.stats.errors.labels(scorer.name).inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a user function may raise anything
            self.stats.errors.labels(scorer.name).inc()
            raise ScorerFailed(
                f"scorer {scorer.name} failed: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        finally:
            self.stats.scorer_seconds.labels(scorer.name).observe(time.perf_counter() - start)
        histogram = self.stats.scores.labels(scorer.name)
        for value in values:
            histogram.observe(value)
        return values, version
