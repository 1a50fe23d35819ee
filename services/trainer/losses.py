"""The policy-gradient loss family (PPO's clipped surrogate as GRPO, DAPO, Dr. GRPO, GSPO and
CISPO aggregate and clip it) and the correction of the rollout/learner mismatch (TIS, MIS), as
small pure torch functions.

Shapes as in rl_math: B sequences, T response tokens right-padded, mask[b, t] = 1 on real tokens.
Every loss takes

    logp        [B, T]  the learner's current logprobs of the sampled tokens (with grad)
    old_logp    [B, T]  the learner's logprobs before this step's first update (no grad)
    advantages  [B, T]  per token (a sequence's advantage repeated over its tokens for GRPO/RLOO)
    mask        [B, T]
    clip_low, clip_high   the ratio is clipped to [1 - clip_low, 1 + clip_high]
    weight      [B, T] or None   a per-token factor on the loss terms (the mismatch correction's
                                 IS weights or 0/1 masks); never differentiated

and returns (loss scalar, stats). stats, as floats over the valid tokens: clipfrac (share of
tokens whose clipped term is the one in effect and its gradient 0), approx_kl (k3 estimate of
KL(old || new), a figure of the update's size; Schulman 2020), ratio_mean, ratio_max.

The mismatch correction compares, token by token, the learner's old logprobs with the behaviour
logprobs vLLM returned when it sampled them: r = pi_learner_old(y_t) / pi_vllm(y_t).
"""

from __future__ import annotations

import torch

from services.trainer.rl_math import kl_k3, masked_mean

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo")
MISMATCH_CORRECTIONS = ("none", "tis", "mis_token", "mis_seq")
# Losses whose denominator counts sequences, not tokens (see `row_weights`).
SEQUENCE_LOSSES = ("grpo", "gspo")


# ---------------------------------------------------------------------------------------------
# Aggregation: how per-token loss terms become one number
# ---------------------------------------------------------------------------------------------


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over every valid token of the batch: a long response weighs more than a short one.
    (DAPO, Yu et al. 2025, sec. 3.3 "Token-Level Policy Gradient Loss"; PPO as cleanrl has it)"""
    return masked_mean(x, mask)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean over its tokens; rows without a valid token
    do not count. (GRPO, Shao et al. 2024 "DeepSeekMath" eq. 3: 1/G sum_i 1/|o_i| sum_t)"""
    m = mask.to(x.dtype)
    per_row = (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # [B]
    rows = (m.sum(-1) > 0).to(x.dtype)  # [B]
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


def constant_normalised_sum(x: torch.Tensor, mask: torch.Tensor, normaliser: float
                            ) -> torch.Tensor:
    """Sum over valid tokens divided by B * normaliser (a constant, e.g. max_new_tokens): no
    length bias either way. (Dr. GRPO, Liu et al. 2025 "Understanding R1-Zero-Like Training:
    A Critical Perspective", sec. 3.1)"""
    if normaliser <= 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    return (x * mask.to(x.dtype)).sum() / (x.shape[0] * normaliser)


def aggregate(loss_type: str, x: torch.Tensor, mask: torch.Tensor,
              max_new_tokens: int | None = None) -> torch.Tensor:
    """Per-token terms [B, T] -> scalar, as `loss_type` aggregates its loss (a KL term in the
    loss is aggregated the same way, so micro batches weighted by `row_weights` add up)."""
    check_loss_type(loss_type)
    if loss_type in SEQUENCE_LOSSES:
        return sequence_mean(x, mask)
    if loss_type == "dr_grpo":
        if not max_new_tokens:
            raise ValueError("dr_grpo needs max_new_tokens (its constant normaliser)")
        return constant_normalised_sum(x, mask, float(max_new_tokens))
    return token_mean(x, mask)


def row_weights(loss_type: str, mask: torch.Tensor) -> torch.Tensor:
    """[B]: each row's part of its loss's denominator, so that a batch split into micro batches
    (each loss the mean of its own rows) adds up to the loss of the whole batch: valid tokens for
    the token means (dapo, cispo), 1 per row with a valid token for the sequence means (grpo,
    gspo), 1 per row for Dr. GRPO's constant normaliser."""
    check_loss_type(loss_type)
    tokens = mask.to(torch.float32).sum(-1)  # [B]
    if loss_type in SEQUENCE_LOSSES:
        return (tokens > 0).to(torch.float32)
    if loss_type == "dr_grpo":
        return torch.ones_like(tokens)
    return tokens


# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------


def clipped_surrogate(logratio: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO terms max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logratio);
    and a 0/1 tensor of where the clipped term is in effect (its gradient is then 0).
    (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7; the two bounds of
    DAPO's "Clip-Higher", Yu et al. 2025, sec. 3.1)"""
    ratio = torch.exp(logratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = (loss2 > loss1).detach()
    return torch.max(loss1, loss2), clipped


def grpo_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO: the clipped surrogate per token, averaged over each sequence's tokens, then over the
    sequences. (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
    Open Language Models", eq. 3, without its KL term, which the learner adds)"""
    terms, clipped = clipped_surrogate(logp - old_logp, advantages, clip_low, clip_high)
    loss = sequence_mean(_weighted(terms, weight), mask)
    return loss, _stats(logp, old_logp, mask, clipped)


def dapo_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO: the clipped surrogate averaged over all valid tokens of the batch (token-mean), with
    the asymmetric bounds of Clip-Higher (the paper: clip_low 0.2, clip_high 0.28). With
    clip_low == clip_high it is PPO's own loss, which the PPO learner uses. (Yu et al. 2025,
    "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", eq. 8; Schulman et al.
    2017, eq. 7)"""
    terms, clipped = clipped_surrogate(logp - old_logp, advantages, clip_low, clip_high)
    loss = token_mean(_weighted(terms, weight), mask)
    return loss, _stats(logp, old_logp, mask, clipped)


def dr_grpo_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float,
                 weight: torch.Tensor | None = None, *, normaliser: float
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO: the clipped surrogate summed over valid tokens and divided by B * normaliser
    (a constant: max_new_tokens); its advantages are r - mean(group) without the std
    (rl_math.group_advantages(normalize_std=False)). (Liu et al. 2025, "Understanding
    R1-Zero-Like Training: A Critical Perspective", sec. 3.1 and eq. 3)"""
    terms, clipped = clipped_surrogate(logp - old_logp, advantages, clip_low, clip_high)
    loss = constant_normalised_sum(_weighted(terms, weight), mask, normaliser)
    return loss, _stats(logp, old_logp, mask, clipped)


def sequence_logratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor
                      ) -> torch.Tensor:
    """[B]: log of GSPO's sequence ratio s_i = (pi(y_i) / pi_old(y_i)) ^ (1 / |y_i|), the
    geometric mean of the token ratios: the mean of the token log ratios over valid tokens.
    (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 7)"""
    m = mask.to(logp.dtype)
    return ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def gspo_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: one ratio per sequence (the geometric mean of its token ratios), clipped per
    sequence, the sequences averaged. Computed in the paper's GSPO-token form,
    s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]: its value is s_i at every token, its gradient
    s_i * grad log pi(y_t), so the sequence mean of the token terms is the paper's loss and its
    gradient, and a per-token weight applies as to the other losses. The paper's clip bounds are
    about 1000 times smaller than PPO's (3e-4, 4e-4): a sequence ratio stays near 1.
    (Zheng et al. 2025, "Group Sequence Policy Optimization", eqs. 5-7 and 13-14)"""
    seq = sequence_logratio(logp, old_logp, mask)  # [B]
    logratio = seq.detach()[:, None] + logp - logp.detach()  # [B, T], value seq_i
    terms, clipped = clipped_surrogate(logratio, advantages, clip_low, clip_high)
    loss = sequence_mean(_weighted(terms, weight), mask)
    stats = _stats(logp, old_logp, mask, clipped)
    with torch.no_grad():
        rows = mask.to(torch.bool).any(-1)
        stats["seq_ratio_mean"] = float(seq[rows].exp().mean()) if rows.any() else 1.0
    return loss, stats


def cispo_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: -sg[clip(r, 1 - clip_low, 1 + clip_high)] * A * log pi(y_t), token-mean. The IS
    weight is clipped and detached, so no token's gradient is dropped (PPO's clip zeroes the
    gradient of clipped tokens; CISPO only bounds its size). MiniMax-M1 sets no lower bound in
    practice (a large clip_low). (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute
    Efficiently with Lightning Attention", sec. 3.1, eq. 4-5)"""
    logratio = logp - old_logp
    ratio = torch.exp(logratio)
    is_weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    terms = -is_weight * advantages * logp
    loss = token_mean(_weighted(terms, weight), mask)
    clipped = ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).detach()
    return loss, _stats(logp, old_logp, mask, clipped)


def policy_loss(loss_type: str, logp, old_logp, advantages, mask, clip_low: float,
                clip_high: float, weight: torch.Tensor | None = None, *,
                max_new_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss named by `loss_type` (one of LOSS_TYPES). Dr. GRPO needs `max_new_tokens`."""
    check_loss_type(loss_type)
    args = (logp, old_logp, advantages, mask, clip_low, clip_high, weight)
    if loss_type == "dr_grpo":
        if not max_new_tokens:
            raise ValueError("dr_grpo needs max_new_tokens (its constant normaliser)")
        return dr_grpo_loss(*args, normaliser=float(max_new_tokens))
    return {"grpo": grpo_loss, "dapo": dapo_loss, "gspo": gspo_loss,
            "cispo": cispo_loss}[loss_type](*args)


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of "
                         f"{', '.join(LOSS_TYPES)}")


def _weighted(terms: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return terms if weight is None else terms * weight.detach()


def _stats(logp, old_logp, mask, clipped) -> dict[str, float]:
    with torch.no_grad():
        logratio = logp - old_logp
        ratio = torch.exp(logratio)
        valid = mask.to(torch.bool)
        ratio_valid = ratio[valid]
        return {
            "clipfrac": float(masked_mean(clipped.to(ratio.dtype), mask)),
            "approx_kl": float(masked_mean((ratio - 1.0) - logratio, mask)),
            "ratio_mean": float(ratio_valid.mean()) if ratio_valid.numel() else 1.0,
            "ratio_max": float(ratio_valid.max()) if ratio_valid.numel() else 1.0,
        }


# ---------------------------------------------------------------------------------------------
# Rollout/learner mismatch correction
# ---------------------------------------------------------------------------------------------
# vLLM samples y_t from pi_vllm; the learner's loss assumes they came from pi_learner_old. The
# two differ (kernels, dtype, a stale adapter), and the gap grows with the step count. Each
# correction is a per-token weight on the loss terms, computed from
#     r_t = pi_learner_old(y_t) / pi_vllm(y_t) = exp(old_logp - behaviour_logp)


def tis_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance sampling: w_t = min(r_t, cap) on valid tokens, 0 elsewhere. [B, T].
    (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
    eq. 3; verl's `rollout_is` token preset, threshold 2)"""
    _check_threshold(cap)
    ratio = torch.exp(old_logp - behaviour_logp).detach()
    return torch.clamp(ratio, max=cap) * mask.to(ratio.dtype)


def mis_token_mask(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                   threshold: float) -> torch.Tensor:
    """Masked importance sampling per token: 1 where 1/threshold <= r_t <= threshold, 0 where
    the token's ratio leaves that band (the token drops out of the loss) and outside the mask.
    [B, T]. (verl's rollout rejection sampling, `rollout_rs: token`, bounds [1/C, C]; TRL's
    `token_mask`)"""
    _check_threshold(threshold)
    logr = (old_logp - behaviour_logp).detach()
    bound = float(torch.log(torch.tensor(threshold, dtype=torch.float64)))
    keep = (logr >= -bound) & (logr <= bound) & mask.to(torch.bool)
    return keep.to(old_logp.dtype)


def mis_seq_mask(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """Masked importance sampling per sequence: a sequence whose geometric-mean ratio
    exp(mean_t log r_t) leaves [1/threshold, threshold] drops out whole; the geometric mean
    keeps the rule independent of the length (a product of 100 ratios of 1.01 is 2.7). [B, T],
    1 on the valid tokens of the kept sequences. (verl's `rollout_rs: geometric` preset;
    TRL's `sequence_mask`)"""
    _check_threshold(threshold)
    m = mask.to(old_logp.dtype)
    seq = (((old_logp - behaviour_logp) * m).sum(-1) / m.sum(-1).clamp_min(1.0)).detach()  # [B]
    bound = float(torch.log(torch.tensor(threshold, dtype=torch.float64)))
    keep = ((seq >= -bound) & (seq <= bound)).to(old_logp.dtype)  # [B]
    return keep[:, None] * m


def mismatch_weights(kind: str, old_logp: torch.Tensor, behaviour_logp: torch.Tensor,
                     mask: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """The per-token loss weights of correction `kind` (one of MISMATCH_CORRECTIONS) on the
    tokens of `mask`, 1 elsewhere (tokens without a behaviour logprob stay uncorrected); None
    for "none". [B, T], detached."""
    if kind == "none":
        return None
    fn = {"tis": tis_weights, "mis_token": mis_token_mask, "mis_seq": mis_seq_mask}.get(kind)
    if fn is None:
        raise ValueError(f"unknown mismatch_correction {kind!r}; expected one of "
                         f"{', '.join(MISMATCH_CORRECTIONS)}")
    m = mask.to(old_logp.dtype)
    return (fn(old_logp, behaviour_logp, mask, threshold) + (1.0 - m)).detach()


def mismatch_stats(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor | None) -> dict[str, float]:
    """Figures of the mismatch over the valid tokens of `mask`:
      mismatch/ratio_mean, mismatch/ratio_max   of r_t
      mismatch/masked_share   share of tokens whose weight is 0 (dropped by MIS; 0 for TIS)
      mismatch/kl    mean per-token k3 estimate of KL(pi_vllm || pi_learner_old) (the tokens
                     were sampled by vLLM; Schulman 2020)"""
    with torch.no_grad():
        valid = mask.to(torch.bool)
        if not bool(valid.any()):
            return {"mismatch/ratio_mean": 1.0, "mismatch/ratio_max": 1.0,
                    "mismatch/masked_share": 0.0, "mismatch/kl": 0.0}
        ratio = torch.exp(old_logp - behaviour_logp)[valid]
        masked = 0.0 if weights is None else float((weights[valid] == 0).float().mean())
        return {
            "mismatch/ratio_mean": float(ratio.mean()),
            "mismatch/ratio_max": float(ratio.max()),
            "mismatch/masked_share": masked,
            "mismatch/kl": float(masked_mean(kl_k3(behaviour_logp, old_logp), mask)),
        }


def _check_threshold(value: float) -> None:
    if not value > 1.0:
        raise ValueError(f"mismatch threshold must be > 1, got {value}")
