"""Scorer specs: `[WEIGHT*]KIND:ARG`, e.g. `0.5*rm:/models/rm`, `rule:length?target=64`,
`python:my_rewards:correctness`. Parsed once at start-up; a bad spec stops the service."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from rlhf.plumbing.errors import FailedPrecondition

KINDS = ("rm", "rule", "python")
# Largest weight magnitude: far beyond any sensible mix, far below where weight * score overflows.
MAX_WEIGHT = 1e6

# The weight prefix is recognised only when it is a number followed by `*` and a known kind, so a
# `*` inside a regex argument (rule:regex?pattern=a*b) is never taken for one.
_SPEC = re.compile(
    r"^\s*(?:(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?"
    r"(?P<kind>[a-z]+):(?P<arg>.+?)\s*$",
    re.S,
)


@dataclass(frozen=True)
class ScorerSpec:
    kind: str
    arg: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        """What responses and metrics call the scorer: the spec without its weight."""
        return f"{self.kind}:{self.arg}"


def parse_spec(text: str) -> ScorerSpec:
    match = _SPEC.match(text)
    if not match:
        raise FailedPrecondition(f"bad scorer spec {text!r}: expected [WEIGHT*]KIND:ARG")
    kind = match["kind"]
    if kind not in KINDS:
        raise FailedPrecondition(
            f"bad scorer spec {text!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})"
        )
    weight = float(match["weight"]) if match["weight"] is not None else 1.0
    if not abs(weight) <= MAX_WEIGHT:  # also catches "1e999", which float() reads as inf
        raise FailedPrecondition(
            f"bad scorer spec {text!r}: the weight must be a number within +-{MAX_WEIGHT:g}")
    return ScorerSpec(kind=kind, arg=match["arg"], weight=weight)


def parse_specs(texts: list[str]) -> list[ScorerSpec]:
    specs = [parse_spec(t) for t in texts]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise FailedPrecondition(f"scorer {spec.name!r} is configured twice")
        seen.add(spec.name)
    return specs


def split_query(arg: str) -> tuple[str, dict[str, str]]:
    """`name?k=v&k2=v2` -> (name, params). Values are percent-decoded without turning `+` into a
    space (regexes need their `+`). Repeated keys are an error: the meaning would be unclear."""
    name, _, query = arg.partition("?")
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        key = unquote(key)
        if not sep:
            raise FailedPrecondition(f"bad parameter {part!r} in {arg!r}: expected key=value")
        if key in params:
            raise FailedPrecondition(f"parameter {key!r} given twice in {arg!r}")
        params[key] = unquote(value)
    return name, params
