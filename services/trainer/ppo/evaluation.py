"""Evaluation during training: a candidate adapter version is scored on held-out prompts before
it is promoted to users, and refused when its eval reward falls too far below the promoted one's.

    eval_prompts (JSONL) -> Generate with the candidate version pinned (staged on the replicas,
    not yet active), eval_samples completions per prompt, a fixed seed -> Score on the reward
    service -> mean/std per version -> should_promote(candidate, promoted, max_eval_drop)

The seed is the same for every evaluation of a run, so two versions are compared on the same
prompts with the same sampling noise (greedy with `eval_temperature: 0`), and evaluating one
version twice gives the same figures. `should_promote` is pure; `Evaluation` holds a run's eval
state (the promoted version's figures, kept in `<out>/evaluation.json`) and turns a decision
into the step's metrics.jsonl figures.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.files import atomic_write
from services.trainer.clients import BadAnswer, Services
from services.trainer.data import read_prompts

log = logging.getLogger("rlhf.trainer")

# The promoted version's eval figures, in the run folder: the baseline of the next decisions,
# also after a resume (from any checkpoint: it describes what users are served).
STATE_FILE = "evaluation.json"
# The seed of eval sampling is seed * SEED_SCALE + SEED_OFFSET (+ the chunk's index): the same
# for every evaluation of a run, and apart from the rollouts' seeds (seed * SEED_SCALE + ...).
SEED_SCALE = 100_003
SEED_OFFSET = 99_991


@dataclass(frozen=True)
class EvalResult:
    """The eval reward of one adapter version: mean and (population) std over its completions."""

    version: int
    reward_mean: float
    reward_std: float
    samples: int


def summarize(version: int, scores: list[float]) -> EvalResult:
    if not scores:
        raise ValueError("an evaluation needs at least one score")
    return EvalResult(version, statistics.fmean(scores), statistics.pstdev(scores), len(scores))


def should_promote(candidate: EvalResult | None, promoted: EvalResult | None,
                   max_eval_drop: float | None) -> tuple[bool, str]:
    """Whether the candidate may replace the promoted version, and why.

    No gate (max_eval_drop None): always. With a gate, a candidate that was not evaluated is
    held back; the first evaluated version (nothing promoted yet) is the baseline and passes;
    otherwise the candidate passes when its eval mean is at most max_eval_drop below the
    promoted one's."""
    if max_eval_drop is None:
        return True, "no eval gate (max_eval_drop unset)"
    if candidate is None:
        return False, "not evaluated (only evaluated versions are promoted under max_eval_drop)"
    if not math.isfinite(candidate.reward_mean):
        return False, f"eval reward of v{candidate.version} is {candidate.reward_mean}"
    if promoted is None:
        return True, f"v{candidate.version} is the first evaluated version (the baseline)"
    drop = promoted.reward_mean - candidate.reward_mean
    figures = (f"eval reward {candidate.reward_mean:.4f} of v{candidate.version} vs "
               f"{promoted.reward_mean:.4f} of promoted v{promoted.version} (drop {drop:.4f}, "
               f"max_eval_drop {max_eval_drop})")
    if drop > max_eval_drop:
        return False, f"eval reward dropped: {figures}"
    return True, f"within max_eval_drop: {figures}"


def is_due(step: int, every: int, last_step: int, stopping: bool = False) -> bool:
    """Evaluation runs on the starting version (step 0), every `every` steps, and on the version
    a run ends with (its last step, or the step it stopped after)."""
    return step == 0 or step % every == 0 or step >= last_step or stopping


async def evaluate(services: Services, records, version: int, *, samples: int,
                   max_new_tokens: int, temperature: float, seed: int,
                   prompts_per_call: int) -> EvalResult:
    """Generates `samples` completions per record with exactly `version` of the run's adapter
    pinned, scores them, and summarizes. A completion served by another version is a BadAnswer:
    its score would be charged to the wrong version."""
    scores: list[float] = []
    for chunk, start in enumerate(range(0, len(records), prompts_per_call)):
        part = records[start:start + prompts_per_call]
        generated = await services.generate(part, samples, max_new_tokens, temperature,
                                            seed + chunk, version)
        wrong = sorted({smp.adapter_version for smp in generated} - {version})
        if wrong:
            raise BadAnswer(f"the evaluation of v{version} was served by version(s) {wrong}")
        scores += await services.score(part, generated)
    return summarize(version, scores)


class Evaluation:
    """One run's evaluation: its prompts and settings, and the promoted version's figures."""

    def __init__(self, settings, records):
        self.s = settings
        self.records = records
        self.promoted: EvalResult | None = None

    @classmethod
    def from_settings(cls, settings) -> Evaluation | None:
        """None when the run has no eval_prompts; DataError (every bad line, or an empty file)
        when they do not read."""
        if settings.eval_prompts is None:
            return None
        return cls(settings, read_prompts(settings.eval_prompts))

    @property
    def gated(self) -> bool:
        """Whether a version must pass evaluation before it is activated."""
        return self.s.max_eval_drop is not None

    def due(self, step: int, stopping: bool = False) -> bool:
        return is_due(step, self.s.eval_every, self.s.steps, stopping)

    async def run(self, services: Services, version: int) -> EvalResult:
        s = self.s
        temperature = s.temperature if s.eval_temperature is None else s.eval_temperature
        return await evaluate(services, self.records, version, samples=s.eval_samples,
                              max_new_tokens=s.max_new_tokens, temperature=temperature,
                              seed=s.seed * SEED_SCALE + SEED_OFFSET,
                              prompts_per_call=s.prompts_per_step)

    def decide(self, candidate: EvalResult | None) -> tuple[bool, str, dict]:
        """(promote, reason, the figures for the step's metrics line); a promoted candidate
        becomes the baseline of the next decisions."""
        baseline = self.promoted
        promote, reason = should_promote(candidate, baseline, self.s.max_eval_drop)
        figures: dict = {"eval/promoted": int(promote), "eval/reason": reason}
        if candidate is not None:
            figures.update({"eval/version": candidate.version,
                            "eval/reward_mean": candidate.reward_mean,
                            "eval/reward_std": candidate.reward_std,
                            "eval/samples": candidate.samples})
        if baseline is not None:
            figures.update({"eval/baseline_version": baseline.version,
                            "eval/baseline_reward_mean": baseline.reward_mean,
                            "eval/baseline_reward_std": baseline.reward_std})
        if promote and candidate is not None:
            self.promoted = candidate
        return promote, reason, figures

    # ---- the promoted version's figures, kept in the run folder

    def save(self, out: Path) -> None:
        if self.promoted is not None:
            atomic_write(out / STATE_FILE, json.dumps(asdict(self.promoted)) + "\n")

    def restore(self, out: Path) -> None:
        """The promoted version's figures from an earlier run on the folder; an unreadable file
        is ignored with a warning (the next evaluated version becomes the baseline)."""
        path = out / STATE_FILE
        try:
            state = json.loads(path.read_text())
            self.promoted = EvalResult(int(state["version"]), float(state["reward_mean"]),
                                       float(state["reward_std"]), int(state["samples"]))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: %s", path, exc)
