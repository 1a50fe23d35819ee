"""Built-in rules (`rule:NAME?k=v&...`): cheap, deterministic scores of one item each.

Every rule is built once from its parameters at start-up, so a typo in a parameter or a bad
regex stops the service instead of failing each call. Lists inside parameters are separated by
`|` (commas already separate scorers in RLHF_REWARD_SCORER).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from rlhf.plumbing.errors import FailedPrecondition, InvalidArgument
from services.reward.items import Item
from services.reward.spec import split_query

Rule = Callable[[Item], float]
_MISSING = object()


class _Params:
    """Typed access to a rule's parameters that remembers which were read, so unknown ones can be
    reported instead of ignored."""

    def __init__(self, spec: str, values: dict[str, str]):
        self.spec = spec
        self.values = values
        self.used: set[str] = set()

    def _raw(self, key: str, default):
        self.used.add(key)
        if key in self.values:
            return self.values[key]
        if default is _MISSING:
            raise FailedPrecondition(f"{self.spec}: parameter {key!r} is required")
        return default

    def _bad(self, key: str, why: str) -> FailedPrecondition:
        return FailedPrecondition(f"{self.spec}: parameter {key}={self.values[key]!r} {why}")

    def text(self, key: str, default=_MISSING) -> str:
        return self._raw(key, default)

    def number(self, key: str, default=_MISSING, kind=float, minimum=None):
        raw = self._raw(key, default)
        if key not in self.values:
            return raw
        try:
            value = kind(raw)
        except ValueError:
            raise self._bad(key, f"is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise self._bad(key, f"must be a finite number >= {minimum}")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self._raw(key, options[0])
        if value not in options:
            raise self._bad(key, f"is not one of {', '.join(options)}")
        return value

    def words(self, key: str) -> list[str]:
        words = [w for w in self._raw(key, _MISSING).split("|") if w]
        if not words:
            raise self._bad(key, "lists no words (separate them with |)")
        return words

    def finish(self) -> None:
        unknown = sorted(set(self.values) - self.used)
        if unknown:
            raise FailedPrecondition(
                f"{self.spec}: unknown parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self.used))}"
            )


# ---- the rules ---------------------------------------------------------------------------------


def _length(p: _Params) -> Rule:
    """1 at the target length, falling linearly to 0 at 0 and at twice the target."""
    target = p.number("target", kind=int, minimum=1)
    unit = p.choice("unit", ("words", "chars", "lines"))
    count = {"words": lambda t: len(t.split()), "chars": len,
             "lines": lambda t: len(t.splitlines())}[unit]
    return lambda item: max(0.0, 1.0 - abs(count(item.completion) - target) / target)


def _keywords(p: _Params) -> Rule:
    """1 when the words are present (mode any / all) or absent (mode none), as whole words."""
    words = p.words("words")
    mode = p.choice("mode", ("any", "all", "none"))
    case = p.choice("case", ("insensitive", "sensitive"))
    flags = re.IGNORECASE if case == "insensitive" else 0
    patterns = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", flags) for w in words]

    def rule(item: Item) -> float:
        hits = [bool(pat.search(item.completion)) for pat in patterns]
        ok = {"any": any(hits), "all": all(hits), "none": not any(hits)}[mode]
        return float(ok)

    return rule


def _regex(p: _Params) -> Rule:
    """1 when the completion matches `pattern` (search anywhere, or the full text)."""
    pattern = p.text("pattern")
    match = p.choice("match", ("search", "full"))
    flag_letters = p.text("flags", "")
    flags = 0
    for letter in flag_letters:
        if letter not in "ims":
            raise p._bad("flags", "may only hold the letters i, m, s")
        flags |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[letter]
    try:
        compiled = re.compile(pattern, flags)
    except re.error as exc:
        raise p._bad("pattern", f"is not a valid regex: {exc}") from None
    find = compiled.fullmatch if match == "full" else compiled.search
    return lambda item: float(find(item.completion) is not None)


_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_THINK_ANSWER = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _format(p: _Params) -> Rule:
    """1 when the completion has the named shape: `json` (parses as JSON), `boxed` (a
    non-empty \\boxed{...}), `think` (<think>...</think> then <answer>...</answer>)."""
    kind = p.choice("kind", ("json", "boxed", "think"))
    check = {
        "json": lambda t: _is_json(t.strip()),
        "boxed": lambda t: any(m.strip() for m in _BOXED.findall(t)),
        "think": lambda t: _THINK_ANSWER.fullmatch(t) is not None,
    }[kind]
    return lambda item: float(check(item.completion))


# Thousands separators only in groups of three, so "5,6" is two numbers, not 56.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def final_number(text: str) -> float | None:
    """The answer a math completion ends with: inside the last \\boxed{}, else after the last
    `####` (GSM8K's marker), else the last number in the text."""
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    elif "####" in text:
        tail = _NUMBER.findall(text.rsplit("####", 1)[1])
        return float(tail[0].replace(",", "")) if tail else None
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def _final_number(p: _Params) -> Rule:
    """1 when the completion's final number equals the reference's (GSM8K-style exact match)."""
    tol = p.number("tol", 1e-6, minimum=0.0)

    def rule(item: Item) -> float:
        want = final_number(item.reference)
        if want is None:
            raise InvalidArgument(f"reference {item.reference[:80]!r} holds no number")
        got = final_number(item.completion)
        return float(got is not None and abs(got - want) <= tol * max(1.0, abs(want)))

    return rule


def _repetition(p: _Params) -> Rule:
    """Minus the share of repeated word n-grams: 0 for no repetition, towards -1 for a loop."""
    n = p.number("n", 3, kind=int, minimum=1)

    def rule(item: Item) -> float:
        words = item.completion.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            return 0.0
        return -(1.0 - len(set(grams)) / len(grams))

    return rule


@dataclass(frozen=True)
class RuleDef:
    build: Callable[[_Params], Rule]
    needs_reference: bool = False


RULES: dict[str, RuleDef] = {
    "length": RuleDef(_length),
    "keywords": RuleDef(_keywords),
    "regex": RuleDef(_regex),
    "format": RuleDef(_format),
    "final_number": RuleDef(_final_number, needs_reference=True),
    "repetition": RuleDef(_repetition),
}


def build_rule(arg: str) -> tuple[Rule, bool]:
    """`NAME?k=v&...` -> (rule, whether items must carry a reference)."""
    name, values = split_query(arg)
    spec = f"rule:{arg}"
    if name not in RULES:
        raise FailedPrecondition(f"{spec}: unknown rule {name!r}; built-ins: {', '.join(RULES)}")
    params = _Params(spec, values)
    definition = RULES[name]
    rule = definition.build(params)
    params.finish()
    return rule, definition.needs_reference
