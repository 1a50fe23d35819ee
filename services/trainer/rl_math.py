"""The math of RLHF as small pure torch functions: PPO, GRPO and RLOO (KL, advantages, the value
loss) and the reward model's losses and figures (Bradley-Terry pairs, binned ratings). The policy
losses and the mismatch correction are in losses.py.

Only torch is imported, so this module and its tests load without vLLM, gRPC or transformers.
Names follow the papers and cleanrl's `ppo.py` (`delta`, `lastgaelam`, `pg_loss1/2`, `clipfrac`,
`approx_kl`). Shapes, unless a function says otherwise:

    B  sequences in the batch (prompts x samples)
    T  response tokens, right-padded: mask[b, t] = 1 for real response tokens, then 0s
    V  vocabulary size

Masks are 0/1 tensors of any dtype (bool, int or float). Losses are means over the valid tokens
of the whole batch (token-level), so long and short responses weigh the same per token.
"""

from __future__ import annotations

import torch

# Added to a standard deviation before dividing by it (GRPO) so a group whose samples all got the
# same score gives advantages of 0, not NaN. TRL uses the same value.
GROUP_STD_EPS = 1e-4
# Added to a variance before its square root when whitening (TRL's `masked_whiten`).
WHITEN_EPS = 1e-8
KL_KINDS = ("k1", "k2", "k3")


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (over `dim`, or over everything).

    x, mask: same shape (or broadcastable). An all-zero mask gives 0, not NaN: its numerator is
    0 and the count is clamped to 1.
    Source: TRL `trl/trainer/utils.py` `masked_mean`; OpenRLHF `openrlhf/models/utils.py`.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is 1 (a scalar).

    With `unbiased`, Bessel's correction n / (n - 1) over the n valid positions; that needs n >= 2.
    Source: TRL `trl/trainer/utils.py` `masked_var`.
    """
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 1:
        raise ValueError("masked_var: the mask selects no elements")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        if n < 2:
            raise ValueError("masked_var: an unbiased variance needs at least 2 valid elements")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` to mean 0 and (unbiased) variance 1 over the valid positions.

    With shift_mean=False the mean is kept and only the scale changes (TRL does that for rewards,
    so their sign survives). Positions outside the mask come back as 0.
    Source: TRL `trl/trainer/utils.py` `masked_whiten`; the PPO "advantage normalisation" of
    cleanrl `ppo.py` (`norm_adv`).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# KL between the policy and the reference, per token
# ---------------------------------------------------------------------------------------------
# Tokens are sampled from the policy pi; the reference is pi_ref. With
#     logr = log pi_ref(y_t) - log pi(y_t)      (log of the ratio r = pi_ref / pi)
# each estimator's expectation under pi relates to KL(pi || pi_ref) = E_pi[-logr]:
#     k1 = -logr                 unbiased, high variance, can be negative per sample
#     k2 = logr^2 / 2            biased (low when pi and pi_ref are close), low variance, >= 0
#     k3 = (r - 1) - logr        unbiased (E_pi[r] = 1), low variance, >= 0 (since log r <= r - 1)
# Source: J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = -logr = logp - ref_logp, per token. Shapes [B, T] -> [B, T]. (Schulman 2020)"""
    logr = ref_logp - logp
    return -logr


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = logr^2 / 2, per token. Shapes [B, T] -> [B, T]. (Schulman 2020)"""
    logr = ref_logp - logp
    return logr.pow(2) / 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (exp(logr) - 1) - logr, per token; never negative. Shapes [B, T] -> [B, T].

    (Schulman 2020; the GRPO paper, DeepSeekMath eq. 4, uses this one.) `expm1` keeps it exact
    for small logr, where r - 1 would cancel.
    """
    logr = ref_logp - logp
    return torch.expm1(logr) - logr


def approx_kl(kind: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate of the kind "k1", "k2" or "k3" (see above). [B, T] -> [B, T].

    Source: OpenRLHF `openrlhf/models/utils.py` `compute_approx_kl(kl_estimator)`.
    """
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k2":
        return kl_k2(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")


def last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards [B, T] that are 0 except the sequence's score on its last valid token
    (PPO's rewards without a KL penalty).

    scores: [B]; mask: [B, T]. Every row needs at least one valid token (a response of 0 tokens
    has nowhere to put its score).
    Source: TRL `PPOTrainer` (the score added at the last non-padded position).
    """
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must have shape [{mask.shape[0]}], got {list(scores.shape)}")
    valid = mask.to(torch.bool)  # [B, T]
    empty = ~valid.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no valid response token to carry their score")
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # [B, T]
    # Index of the last valid token in each row (works for any mask, not only right-padded):
    # positions times the mask, argmax picks the largest valid position.
    positions = torch.arange(mask.shape[1], device=mask.device)  # [T]
    last = (positions * valid).argmax(dim=1)  # [B]
    rows = torch.arange(mask.shape[0], device=mask.device)  # [B]
    return rewards.index_put((rows, last), scores.to(dtype))


def kl_shaped_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: r_t = -kl_coef * kl_t, plus the sequence's score on its last
    valid token.

    scores: [B] one reward-model score per sequence. logp, ref_logp, mask: [B, T].
    Returns (rewards [B, T], kl [B, T]), both 0 outside the mask: the caller reads its KL figures
    from this `kl` rather than computing the estimator again. Every row needs at least one valid
    token (a response of 0 tokens has nowhere to put its score).
    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2;
    Ouyang et al. 2022 (InstructGPT) eq. 2; TRL `PPOTrainer` (`non_score_reward`, score added at
    the last non-padded position).
    """
    if scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must have shape [{logp.shape[0]}], got {list(scores.shape)}")
    valid = mask.to(torch.bool)  # [B, T]
    kl = approx_kl(kind, logp, ref_logp) * valid.to(logp.dtype)  # [B, T]
    rewards = -kl_coef * kl + last_token_rewards(scores.to(logp.dtype), mask)  # [B, T]
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient (beta). Same interface as AdaptiveKLController.

    Source: Ziegler et al. 2019 (fixed beta); OpenRLHF `kl_controller.py` `FixedKLController`.
    """

    kind = "fixed"

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient that steers the measured KL toward `target`.

        e_t  = clip(KL_t / target - 1, -0.2, 0.2)          proportional error
        beta = beta * (1 + e_t * n_steps / horizon)

    With KL above target beta grows, below it shrinks; the clip bounds each change. `n_steps` is
    the number of samples (sequences) the KL was measured on and `horizon` sets the time scale.
    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2
    (K_beta = 0.1); OpenRLHF `openrlhf/trainer/ppo_utils/kl_controller.py`.
    """

    kind = "adaptive"
    ERROR_CLIP = 0.2  # the paper's bound on the proportional error

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -self.ERROR_CLIP),
                                 self.ERROR_CLIP)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "target": self.target,
                "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


def _check_kind(state: dict, kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state is for a {state.get('kind')!r} KL controller, not {kind!r}")


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over a batch of right-padded responses.

        delta_t = r_t + gamma * V_{t+1} - V_t            (V after the last valid token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                               (the value target)

    rewards, values, mask: [B, T]; mask must be right-padded (1s, then 0s). The recursion runs
    backwards over T for all B rows at once. Returns (advantages [B, T], returns [B, T]), 0
    outside the mask. Padding values/rewards are ignored, whatever they hold.
    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation", eq. 16; cleanrl `ppo.py` (`lastgaelam`, `nextnonterminal`).
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must share one [B, T] shape, got {list(rewards.shape)}, "
            f"{list(values.shape)}, {list(mask.shape)}"
        )
    m = mask.to(values.dtype)  # [B, T]
    if (m[:, 1:] > m[:, :-1]).any():
        raise ValueError("gae: mask must be right-padded (a 1 never follows a 0 in a row)")
    rewards = rewards * m
    values = values * m
    B, T = values.shape
    advantages = torch.zeros_like(values)  # [B, T]
    lastgaelam = torch.zeros(B, dtype=values.dtype, device=values.device)  # [B]
    for t in reversed(range(T)):
        if t + 1 < T:
            nextnonterminal = m[:, t + 1]  # 0 at each row's last valid token
            nextvalues = values[:, t + 1]
        else:
            nextnonterminal = torch.zeros_like(lastgaelam)
            nextvalues = torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues * nextnonterminal - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * m
    returns = (advantages + values) * m
    return advantages, returns


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {list(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (samples per prompt), got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    if not scores.is_floating_point():
        scores = scores.float()
    return scores.view(-1, group_size)  # [P, G]


def group_advantages(
    scores: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = GROUP_STD_EPS
) -> torch.Tensor:
    """GRPO's outcome advantage: each sample's score against its prompt's group.

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     normalize_std=True (GRPO)
        A_i =  r_i - mean(r_group)                             normalize_std=False (Dr. GRPO)

    scores: [P * G], laid out [prompt0 sample0..G-1, prompt1 sample0..G-1, ...]; returns the
    same shape. std is the unbiased sample std of each group (torch's default, as TRL).
    Source: Shao et al. 2024, "DeepSeekMath" sec. 4.1.2 (outcome supervision); Liu et al. 2025,
    "Understanding R1-Zero-Like Training" (Dr. GRPO) for dropping the std.
    """
    grouped = _groups(scores, group_size)  # [P, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)  # [P * G]


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out: each sample's baseline is the mean of the other samples of its
    prompt.

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j

    scores: [P * G] laid out as in `group_advantages`; returns the same shape.
    Source: Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et
    al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization..." (RLOO).
    """
    grouped = _groups(scores, group_size)  # [P, G]
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [P, G]
    return (grouped - baseline).reshape(-1)


# ---------------------------------------------------------------------------------------------
# The critic's loss
# ---------------------------------------------------------------------------------------------


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's loss with PPO-style clipping of the value update.

        v_clipped = old_values + clip(values - old_values, -eps_v, eps_v)
        vf_loss   = 0.5 * mean over valid tokens of max((values - R)^2, (v_clipped - R)^2)

    values (with grad), old_values (from the rollout), returns (GAE targets), mask: [B, T].
    stats: vf_clipfrac (share of valid tokens where the clipped error is the larger one, i.e.
    clipping bit), value_mean.
    Source: cleanrl `ppo.py` (`clip_vloss`, `v_loss_unclipped`, `v_loss_clipped`); TRL
    `PPOTrainer` (`vf_clipfrac`).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_loss1 = (values - returns) ** 2  # [B, T]
    vf_loss2 = (v_clipped - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": float(masked_mean((vf_loss2 > vf_loss1).to(values.dtype), mask)),
            "value_mean": float(masked_mean(values, mask)),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------
# The reward model
# ---------------------------------------------------------------------------------------------


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log P(chosen > rejected) = -log sigmoid(r_c - r_r), averaged. [B], [B] ->
    scalar.
    Source: Ouyang et al. 2022 (InstructGPT) eq. 1; TRL `RewardTrainer`.
    """
    return -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()


def expected_rating(logits: torch.Tensor, bins: torch.Tensor | None) -> torch.Tensor:
    """[B, K] -> [B]: the logit itself for K = 1, else sum_k softmax_k * bin value_k (the reward
    of a model trained on binned ratings; PaLM-rlhf-pytorch's `num_binned_output`)."""
    if logits.shape[-1] == 1:
        return logits[:, 0]
    return logits.softmax(-1) @ bins


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where chosen scores strictly higher (a tie counts as wrong)."""
    return float((r_chosen > r_rejected).float().mean())


def concordance(pred: torch.Tensor, ratings: torch.Tensor) -> float:
    """Pairwise accuracy for ratings: over all pairs with different ratings, the share whose
    predicted rewards are ordered the same way. [N], [N] -> float (NaN if all ratings tie)."""
    diff_true = ratings[:, None] - ratings[None, :]
    diff_pred = pred[:, None] - pred[None, :]
    mask = diff_true > 0
    if not bool(mask.any()):
        return float("nan")
    return float((diff_pred[mask] > 0).float().mean())


# ---------------------------------------------------------------------------------------------
# From logits
# ---------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in float32: logits [..., V], labels [...] -> [...].

    Computed as logit[label] - logsumexp(logits), which never holds a full [..., V] log-softmax.
    Logits in another dtype (bf16) are upcast one row of the leading dim at a time, so the
    float32 copy is at most [T, V].
    Source: the `logprobs_from_logits` of TRL / OpenRLHF (`log_probs_from_logits`); the row loop
    for low-precision logits follows TRL's `selective_log_softmax`.
    """
    if logits.dtype == torch.float32 or logits.dim() < 2:
        logits = logits.float()
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    return torch.stack(
        [logprobs_from_logits(row.float(), row_labels) for row, row_labels in zip(logits, labels,
                                                                                   strict=True)]
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits), in float32: [..., V] -> [...].

        H = logsumexp(z) - sum_v softmax(z)_v * z_v

    Source: OpenRLHF `openrlhf/models/utils.py` `compute_entropy`; TRL `entropy_from_logits`.
    """
    logits = logits.float()
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)



# ---------------------------------------------------------------------------------------------
# Direct preference optimisation
# ---------------------------------------------------------------------------------------------
#
# Inputs are sequence log-probabilities: the sum over a response's tokens of log pi(token) under
# the trained policy (logp_*) and under the frozen reference (ref_logp_*), one value per pair,
# [B] each. The policy's implicit reward of a response is beta * (logp - ref_logp) (Rafailov et
# al. 2023, eq. 5 up to a term of the prompt alone, which cancels within a pair).


def dpo_implicit_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (logp - ref_logp): the reward the policy implicitly assigns a response. [B] -> [B].
    Source: Rafailov et al. 2023, "Direct Preference Optimization", section 5.
    """
    return beta * (logp - ref_logp)


def dpo_log_ratio_margin(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor,
                         ref_logp_chosen: torch.Tensor,
                         ref_logp_rejected: torch.Tensor) -> torch.Tensor:
    """h = (logp_c - ref_c) - (logp_r - ref_r): how much more the policy than the reference
    prefers chosen over rejected, in log-probability. [B] x 4 -> [B]."""
    return (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)


def dpo_sigmoid_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor,
                     ref_logp_chosen: torch.Tensor, ref_logp_rejected: torch.Tensor,
                     beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The DPO loss, averaged over the pairs: -log sigmoid(beta * h), h as in
    `dpo_log_ratio_margin`. With label smoothing eps (the share of pairs assumed mislabelled):
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). [B] x 4 -> scalar.

    Source: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", eq. 7; label smoothing: Mitchell 2023, "A note on DPO with noisy
    preferences" (conservative DPO), as TRL's `label_smoothing`.
    """
    h = beta * dpo_log_ratio_margin(logp_chosen, logp_rejected, ref_logp_chosen,
                                    ref_logp_rejected)
    logsig = torch.nn.functional.logsigmoid
    return (-(1.0 - label_smoothing) * logsig(h) - label_smoothing * logsig(-h)).mean()


def ipo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor,
             ref_logp_chosen: torch.Tensor, ref_logp_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """The IPO loss, averaged over the pairs: (h - 1 / (2 beta))^2, h as in
    `dpo_log_ratio_margin`. A squared loss with a finite target margin, so a pair the policy
    already prefers strongly is pulled back rather than pushed further (the DPO loss only
    flattens). Here beta is the regularisation strength tau of the paper. [B] x 4 -> scalar.

    Source: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17 (sampled IPO).
    """
    h = dpo_log_ratio_margin(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected)
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean()


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_KINDS",
    "approx_kl",
    "bt_loss",
    "clipped_value_loss",
    "concordance",
    "dpo_implicit_rewards",
    "dpo_log_ratio_margin",
    "dpo_sigmoid_loss",
    "entropy_from_logits",
    "expected_rating",
    "gae",
    "group_advantages",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_shaped_rewards",
    "last_token_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "pairwise_accuracy",
    "rloo_advantages",
]
