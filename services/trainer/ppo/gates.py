"""Gates a step's update must pass before its version may be saved as promotable, and the
snapshot that undoes a step that fails them.

A step passes when its loss figures, every gradient norm before clipping and every trainable
weight are finite, and the update's size is within `max_update_norm`. The size is the relative
L2 norm of the change of the policy's LoRA weights over the step (every A and B matrix taken as
one vector): ||theta_after - theta_before|| / ||theta_before||. A fresh LoRA's A matrices are
random and its B matrices zero, so theta_before is never zero; 1.0 means the step moved the
policy's adapter by as much as its whole size. The checks are pure: tensors and numbers in, a
`Verdict` out.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Below this the policy's weights count as zero: the change is then measured against 1.
_TINY_NORM = 1e-12


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str = ""
    update_norm: float = 0.0  # relative L2 change of the policy's weights (nan if unknown)
    grad_norm: float = 0.0    # the largest gradient norm before clipping over the step


def nonfinite_figures(figures: Mapping[str, float]) -> list[str]:
    """Names of the figures that are not finite numbers."""
    return [k for k, v in figures.items() if not math.isfinite(v)]


def first_nonfinite(named: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding an inf or a NaN, or None."""
    for name, tensor in named:
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def update_norm(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """||after - before|| / ||before|| over all the tensors as one vector (float64)."""
    change = sum(float((a.detach().double() - b.double()).pow(2).sum())
                 for b, a in zip(before, after, strict=True))
    size = math.sqrt(sum(float(b.double().pow(2).sum()) for b in before))
    return math.sqrt(change) / (size if size > _TINY_NORM else 1.0)


def judge(figures: Mapping[str, float], grad_norms: Sequence[float],
          weights: Sequence[tuple[str, torch.Tensor]], policy_before: Sequence[torch.Tensor],
          policy_after: Sequence[torch.Tensor], max_update_norm: float) -> Verdict:
    """The step's verdict: the first gate that fails names the reason."""
    grad_norm = max(grad_norms, default=0.0)
    bad = nonfinite_figures(figures)
    if bad:
        return Verdict(False, f"non-finite loss: {', '.join(f'{k}={figures[k]}' for k in bad)}",
                       math.nan, grad_norm)
    bad_grad = next((g for g in grad_norms if not math.isfinite(g)), None)
    if bad_grad is not None:
        return Verdict(False, f"non-finite gradient norm before clipping ({bad_grad})",
                       math.nan, bad_grad)
    name = first_nonfinite(weights)
    if name is not None:
        return Verdict(False, f"non-finite trainable weight {name}", math.nan, grad_norm)
    size = update_norm(policy_before, policy_after)
    if not size <= max_update_norm:
        return Verdict(False, f"update too large: relative L2 change of the policy's weights "
                       f"{size:.4g} > max_update_norm {max_update_norm:g}", size, grad_norm)
    return Verdict(True, "", size, grad_norm)


class Snapshot:
    """The trainable weights and the optimizer state before a step, to roll the step back."""

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer):
        self.params = list(params)
        self.weights = [p.detach().clone() for p in self.params]
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())

    def restore(self, optimizer) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self.weights, strict=True):
                p.copy_(saved)
                p.grad = None
        optimizer.load_state_dict(self.optimizer_state)


def finite_only(metrics: Mapping) -> dict:
    """`metrics` without the numbers that are not finite (a metrics line stays valid JSON; the
    gate's reason names what was not finite)."""
    return {k: v for k, v in metrics.items()
            if not (isinstance(v, float) and not math.isfinite(v))}


class GateFailed(RuntimeError):
    """The run stops: on_bad_step stop, and max_bad_steps steps in a row failed their gates."""
