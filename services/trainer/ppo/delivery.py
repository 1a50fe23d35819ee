"""The delivery check: do the policy replicas serve the weights the learner trained?

Two comparisons, both on rollouts the learner is about to train on:

- digest: every Generate result names the sha256 of the adapter version that produced it
  (ServedBy.sha256); it must equal the sha256 of the folder the learner pushed as that version.
  Every batch, every sample.
- logprobs: the first rollouts of each new version (`delivery_samples` of them) go through the
  learner's own policy with that version's weights (kept from the push: with max_staleness >= 1
  the learner has trained further by the time they arrive), and the per-token mean
  |policy's logprob - learner's logprob| over their completion tokens must stay within
  `delivery_threshold`. Measured on the tiny test model: fp32 vLLM vs the fp32 learner agree
  within 1e-4 per token; a bfloat16 policy vs the fp32 learner within ~0.02; an adapter other
  than the one pushed differs by ~0.9 (tests/trainer/test_delivery.py measures the three).

A failed check marks the version "not delivered as trained": its rollouts are refused (never
trained on), the figures go to metrics.jsonl (`delivery/ok` 0, `delivery/mismatch`) and to the
Prometheus gauges below (deploy/monitoring/alerts.yaml alerts on them), and the run fails with
the reason. `mean_abs_diff` and `digest_problem` are pure; `DeliveryCheck` keeps the per-version
state; the forward pass is `learner_logprobs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf.plumbing import metrics as m
from services.trainer.clients import Sample
from services.trainer.ppo.actor_critic import ActorCritic, make_batch

log = logging.getLogger("rlhf.trainer")

# Versions whose weights wait for their first rollouts; older ones are forgotten (their rollouts
# are past max_staleness long before this many pushes).
MAX_PENDING = 8

OK_GAUGE = m.gauge("rlhf_trainer_delivery_ok", "1 when the latest checked adapter version is "
                   "served as trained (digest and logprobs), 0 when it is not")
MISMATCH_GAUGE = m.gauge("rlhf_trainer_delivery_mismatch", "Per-token mean |policy - learner| "
                         "logprob of the latest checked version's first rollouts (nats)")
# Nothing found undelivered until a check says otherwise (0 is what the alert fires on).
OK_GAUGE.set(1.0)
MISSED_GAUGE = m.gauge("rlhf_trainer_push_missed_replicas", "Replicas that staged the latest "
                       "version but missed its activation (after retries)")


class NotDelivered(RuntimeError):
    """A version the policy serves is not the one the learner pushed; the run stops."""


@dataclass
class Verdict:
    version: int
    ok: bool
    mismatch: float | None  # None: logprobs not compared (no threshold, or no weights kept)
    reason: str = ""

    def figures(self) -> dict:
        out = {"delivery/ok": 1.0 if self.ok else 0.0, "delivery/version": self.version}
        if self.mismatch is not None:
            out["delivery/mismatch"] = self.mismatch
        return out


def digest_problem(samples: Sequence[Sample], expected: dict[int, str]) -> str | None:
    """Why a sample's served digest differs from the pushed one of its version, or None.
    Samples of versions this learner did not push (the base model, 0) are not compared."""
    for smp in samples:
        want = expected.get(smp.adapter_version)
        if want is not None and smp.adapter_sha256 != want:
            got = smp.adapter_sha256 or "no digest"
            return (f"v{smp.adapter_version} was served with sha256 {got[:16]}, pushed as "
                    f"{want[:16]}")
    return None


def mean_abs_diff(learner: torch.Tensor, behaviour: torch.Tensor, known: torch.Tensor) -> float:
    """Per-token mean |learner - behaviour| over the positions `known` marks ([B, T] each)."""
    count = float(known.sum())
    if count == 0:
        return 0.0
    return float(((learner - behaviour).abs() * known).sum()) / count


def behaviour_tensors(samples: Sequence[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, width] the policy's logprobs, [B, width] 1 where it returned one)."""
    behaviour = torch.zeros(len(samples), width)
    known = torch.zeros(len(samples), width)
    for i, smp in enumerate(samples):
        n = min(len(smp.behaviour_logprobs), len(smp.completion_ids), width)
        behaviour[i, :n] = torch.tensor(smp.behaviour_logprobs[:n])
        known[i, :n] = 1.0
    return behaviour, known


def policy_weights(model: ActorCritic) -> list[torch.Tensor]:
    """A copy of the policy adapter's weights (what was pushed)."""
    return [p.detach().clone() for p in model.adapter_parameters("policy")]


def learner_logprobs(model: ActorCritic, samples: Sequence[Sample],
                     weights: list[torch.Tensor] | None) -> float:
    """Per-token mean |policy - learner| logprob of `samples` under the learner's policy with
    `weights` (None: the current ones) swapped in for the pass and restored after it."""
    params = model.adapter_parameters("policy")
    saved = [p.detach().clone() for p in params] if weights is not None else None
    with torch.no_grad():
        try:
            if weights is not None:
                for p, w in zip(params, weights, strict=True):
                    p.copy_(w)
            batch = make_batch([s.prompt_ids for s in samples],
                               [s.completion_ids for s in samples], model.pad_id)
            batch = batch.to(getattr(model, "device", torch.device("cpu")))
            logp, _ = model.policy_logprobs(batch, entropy=False)
        finally:
            if saved is not None:
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
    behaviour, known = behaviour_tensors(samples, logp.shape[1])
    known = known * batch.response_mask.cpu()
    return mean_abs_diff(logp.float().cpu(), behaviour, known)


class DeliveryCheck:
    """What the learner pushed per version, and which versions still await their check."""

    def __init__(self, threshold: float | None, samples: int):
        self.threshold = threshold
        self.samples = samples
        self.expected: dict[int, str] = {}  # version -> sha256 pushed
        self._pending: dict[int, list[torch.Tensor] | None] = {}  # version -> its weights

    def pushed(self, version: int, sha256: str, weights: list[torch.Tensor] | None) -> None:
        """`version` was staged with digest `sha256`; `weights`: the learner's policy weights
        it holds (None when logprobs are not compared)."""
        self.expected[version] = sha256
        self._pending[version] = weights if self.threshold is not None else None
        while len(self._pending) > MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        while len(self.expected) > 4 * MAX_PENDING:
            self.expected.pop(next(iter(self.expected)))

    def judge(self, samples: Sequence[Sample],
              compare: Callable[[list[Sample], list[torch.Tensor] | None], float] | None,
              ) -> list[Verdict]:
        """Verdicts on `samples`: the digest of every sample, and the logprobs of the first
        rollouts of each version not checked yet (through `compare`, the learner's pass; None
        skips it). A failed verdict is the first of the list."""
        problem = digest_problem(samples, self.expected)
        if problem is not None:
            version = next(s.adapter_version for s in samples
                           if s.adapter_version in self.expected
                           and s.adapter_sha256 != self.expected[s.adapter_version])
            self._pending.pop(version, None)
            return [self._record(Verdict(version, False, None, problem))]
        verdicts = []
        for version in sorted({s.adapter_version for s in samples} & set(self._pending)):
            weights = self._pending.pop(version)
            mismatch = None
            if self.threshold is not None and compare is not None:
                first = [s for s in samples if s.adapter_version == version][: self.samples]
                mismatch = compare(first, weights)
                if not mismatch <= self.threshold:  # NaN fails too
                    verdict = self._record(Verdict(
                        version, False, mismatch,
                        f"v{version}: the policy's logprobs differ from the learner's by "
                        f"{mismatch:.4g} nats per token (delivery_threshold "
                        f"{self.threshold:g})"))
                    return [verdict, *verdicts]
            verdicts.append(self._record(Verdict(version, True, mismatch)))
        return verdicts

    @staticmethod
    def _record(verdict: Verdict) -> Verdict:
        OK_GAUGE.set(1.0 if verdict.ok else 0.0)
        if verdict.mismatch is not None:
            MISMATCH_GAUGE.set(verdict.mismatch)
        if not verdict.ok:
            log.error("adapter v%d is not delivered as trained: %s", verdict.version,
                      verdict.reason)
        return verdict
