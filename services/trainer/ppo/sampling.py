"""What a step trains on, between the rollouts and the update: dynamic sampling and overlong
shaping (DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
arXiv:2503.14476, sections 3.2 and 3.4).

- Dynamic sampling: a group whose rewards are all equal has a group-relative advantage of zero
  for every sample; it adds nothing to the gradient but still counts in the loss's normaliser.
  Such groups are dropped and the step draws further prompts until it holds `prompts_per_step`
  informative groups, at most `max_refill_rounds` extra draws; when those run out it trains on
  the groups it has (`sampling/groups_short` says how many were missing) rather than stall.
- Overlong shaping of completions that reached max_new_tokens (`truncated`): `filter` keeps
  them out of the loss (their reward still counts in their group's statistics), `penalty` adds
  DAPO's soft overlong punishment to the reward of every completion in the last
  `overlong_buffer` tokens, falling linearly to -overlong_penalty at max_new_tokens.

`informative_groups` and `overlong_penalty` are pure; `collect` drives a `draw(n)` coroutine
(generate and score n further prompts from the data cursor) and does no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.trainer.clients import Sample
from services.trainer.ppo.settings import PPOSettings


def informative_groups(scores: Sequence[float], group: int) -> list[bool]:
    """Per group of `group` consecutive scores: False when they are all equal (zero variance,
    hence zero group-relative advantage), True otherwise."""
    if group < 1 or len(scores) % group:
        raise ValueError(f"{len(scores)} scores do not split into groups of {group}")
    return [max(scores[i: i + group]) != min(scores[i: i + group])
            for i in range(0, len(scores), group)]


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment (eq. 13) of a completion of `length` tokens:

        0                                   length <= L_max - L_cache
        -penalty * (length - (L_max - L_cache)) / L_cache    up to L_max
        -penalty                            length >= L_max

    with L_max = max_new_tokens and L_cache = buffer (1 <= buffer <= max_new_tokens)."""
    if not 1 <= buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer {buffer} must be in [1, {max_new_tokens}]")
    free = max_new_tokens - buffer
    if length <= free:
        return 0.0
    return -penalty * min(length - free, buffer) / buffer


def shape(samples: list[Sample], s: PPOSettings) -> None:
    """Applies `s.overlong` to freshly scored samples, in place."""
    for smp in samples:
        if s.overlong == "filter" and smp.truncated:
            smp.in_loss = False
        elif s.overlong == "penalty":
            smp.score += _penalty(smp, s)


@dataclass
class Collected:
    """A step's batch and how it was gathered."""

    samples: list[Sample] = field(default_factory=list)
    groups_drawn: int = 0
    groups_dropped: int = 0
    refill_rounds: int = 0
    groups_short: int = 0  # informative groups missing when the refill rounds ran out
    penalty: float = 0.0   # mean overlong penalty of the batch's samples

    def figures(self) -> dict[str, float]:
        n = len(self.samples)
        return {
            "sampling/dropped_share": (self.groups_dropped / self.groups_drawn
                                       if self.groups_drawn else 0.0),
            "sampling/refill_rounds": float(self.refill_rounds),
            "sampling/groups_short": float(self.groups_short),
            "sampling/truncated_share": (sum(x.truncated for x in self.samples) / n
                                         if n else 0.0),
            "sampling/overlong_penalty": self.penalty,
        }


async def collect(draw: Callable[[int], Awaitable[list[Sample]]], s: PPOSettings) -> Collected:
    """The step's batch: `s.prompts_per_step` groups of `s.samples_per_prompt` samples, drawn
    with `draw(n)` (n further prompts -> their scored samples); with dynamic sampling, groups
    with equal rewards dropped and refilled (see the module's docstring)."""
    group = s.samples_per_prompt
    out = Collected()
    drawn: list[Sample] = []
    while True:
        need = s.prompts_per_step - len(out.samples) // group
        drawn = sorted(await draw(need), key=lambda x: x.prompt_index)  # grouped by prompt
        shape(drawn, s)
        out.groups_drawn += need
        if not s.dynamic_sampling:
            out.samples = drawn
            break
        keep = informative_groups([x.score for x in drawn], group)
        for g, kept in enumerate(keep):
            if kept:
                out.samples += drawn[g * group: (g + 1) * group]
            else:
                out.groups_dropped += 1
        if all(keep) or out.refill_rounds >= s.max_refill_rounds:
            break
        out.refill_rounds += 1
    out.groups_short = s.prompts_per_step - len(out.samples) // group
    if not out.samples:
        # No group had a signal: the last draw trains (its advantages are zero, so the step
        # moves the weights by the KL term alone) and the run goes on.
        out.samples = drawn
    for i, smp in enumerate(out.samples):
        smp.prompt_index = i // group  # the sample's group in the step's batch
    if out.samples:
        out.penalty = sum(_penalty(x, s) for x in out.samples) / len(out.samples)
    return out


def _penalty(smp: Sample, s: PPOSettings) -> float:
    if s.overlong != "penalty":
        return 0.0
    return overlong_penalty(len(smp.completion_ids), s.max_new_tokens, s.overlong_buffer,
                            s.overlong_penalty)
