"""Reference loops the trainer's vectorised math is tested against: the textbook formula, one
sequence and one step at a time, in Python floats."""

from __future__ import annotations

import torch


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as rl_math.gae. (Schulman et al. 2016, eq. 16)"""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum().item())  # valid tokens come first
        lastgaelam = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages[b, t] = lastgaelam
    valid = mask.to(torch.float64)
    returns = (advantages + values.to(torch.float64)) * valid
    return advantages.to(values.dtype), returns.to(values.dtype)
