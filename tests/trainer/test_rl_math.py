"""services/trainer/rl_math.py: the vectorised code against plain loops, small cases by hand."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer import rl_math as pm
from tests.trainer.oracles import gae_reference


def _ragged_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()  # [B, T]


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_textbook_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[0], lengths[1] = T, 1  # a full row and a one-token row every time
    mask = _ragged_mask(lengths, T)
    # Junk after each row's end: gae must ignore it.
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    gamma = float(torch.empty(1).uniform_(0.8, 1.0, generator=g))
    lam = float(torch.empty(1).uniform_(0.5, 1.0, generator=g))

    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_reference(rewards, values, mask, gamma, lam)

    torch.testing.assert_close(adv, adv_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-10, atol=1e-10)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go over the 3 valid tokens: 6, 5, 3
    torch.testing.assert_close(adv, torch.tensor([[5.5, 4.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


def test_gae_small_case_by_hand():
    # gamma=0.5, lam=0.5; V = [1, 2], r = [0, 4]; V after the end = 0.
    # delta_1 = 4 + 0 - 2 = 2;             A_1 = 2
    # delta_0 = 0 + 0.5*2 - 1 = 0;         A_0 = 0 + 0.25 * 2 = 0.5
    adv, ret = pm.gae(torch.tensor([[0.0, 4.0]]), torch.tensor([[1.0, 2.0]]),
                      torch.tensor([[1.0, 1.0]]), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 2.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.5, 4.0]]))


def test_gae_rejects_a_mask_that_is_not_right_padded():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="right-padded"):
        pm.gae(x, x, torch.tensor([[1, 0, 1]]), 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def test_masked_mean_and_var():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(pm.masked_mean(x, mask)) == pytest.approx(3.0)
    torch.testing.assert_close(pm.masked_mean(x, mask, dim=1), torch.tensor([2.0, 5.0]))
    # values 1, 3, 5: mean 3, sum of squares 8
    assert float(pm.masked_var(x, mask)) == pytest.approx(4.0)
    assert float(pm.masked_var(x, mask, unbiased=False)) == pytest.approx(8 / 3)
    assert float(pm.masked_mean(x, torch.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError):
        pm.masked_var(x, torch.zeros_like(mask))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 10, generator=g, dtype=torch.float64)
    mask = _ragged_mask([10, 7, 3, 1], 10)
    w = pm.masked_whiten(x, mask, shift_mean=shift_mean)
    expected_mean = 0.0 if shift_mean else float(pm.masked_mean(x, mask))
    assert float(pm.masked_mean(w, mask)) == pytest.approx(expected_mean, abs=1e-9)
    assert float(pm.masked_var(w, mask)) == pytest.approx(1.0, rel=1e-6)
    assert (w[mask == 0] == 0).all()


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


def test_kl_estimators_on_known_values():
    logp = torch.tensor([math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25)])
    # logr = log(0.25 / 0.5) = -log 2
    ln2 = math.log(2)
    assert float(pm.kl_k1(logp, ref_logp)) == pytest.approx(ln2)
    assert float(pm.kl_k2(logp, ref_logp)) == pytest.approx(ln2**2 / 2)
    assert float(pm.kl_k3(logp, ref_logp)) == pytest.approx((0.5 - 1) + ln2)
    for kind, fn in (("k1", pm.kl_k1), ("k2", pm.kl_k2), ("k3", pm.kl_k3)):
        assert torch.equal(pm.approx_kl(kind, logp, ref_logp), fn(logp, ref_logp))
        # identical distributions: every estimator is 0
        assert float(pm.approx_kl(kind, logp, logp)) == 0.0
    with pytest.raises(ValueError, match="k4"):
        pm.approx_kl("k4", logp, ref_logp)


def test_k3_is_never_negative():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(1000, generator=g) * 10
    ref_logp = -torch.rand(1000, generator=g) * 10
    assert (pm.kl_k3(logp, ref_logp) >= 0).all()
    assert (pm.kl_k2(logp, ref_logp) >= 0).all()
    assert (pm.kl_k1(logp, ref_logp) < 0).any()  # k1 is only non-negative on average


def test_k1_and_k3_are_unbiased_on_samples():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(8, generator=g), dim=0)  # the policy
    q = torch.softmax(torch.randn(8, generator=g) * 0.5, dim=0)  # the reference
    true_kl = float((p * (p.log() - q.log())).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref_logp = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        estimate = float(pm.approx_kl(kind, logp, ref_logp).mean())
        assert estimate == pytest.approx(true_kl, rel=0.03), kind


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.9, 0.9]]))
    ref_logp = torch.log(torch.tensor([[0.25, 0.5, 0.1], [0.4, 0.1, 0.1]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    scores = torch.tensor([5.0, -1.0])
    rewards, kl = pm.kl_shaped_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, kind="k1")
    ln2 = math.log(2)
    torch.testing.assert_close(kl, torch.tensor([[ln2, 0.0, 0.0], [-ln2, 0.0, 0.0]]))
    torch.testing.assert_close(
        rewards, torch.tensor([[-0.1 * ln2, 5.0, 0.0], [0.1 * ln2 - 1.0, 0.0, 0.0]])
    )
    with pytest.raises(ValueError, match="no valid response token"):
        pm.kl_shaped_rewards(scores, logp, ref_logp, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_last_token_rewards_are_the_kl_free_shaped_rewards():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    scores = torch.tensor([5.0, -1.0, 2.0])
    rewards = pm.last_token_rewards(scores, mask)
    torch.testing.assert_close(
        rewards, torch.tensor([[0.0, 5.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    logp = torch.randn(3, 3)
    shaped, _ = pm.kl_shaped_rewards(scores, logp, logp + 0.3, mask, kl_coef=0.0)
    assert torch.equal(shaped, rewards)
    with pytest.raises(ValueError, match="no valid response token"):
        pm.last_token_rewards(scores, torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1]]))


# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_the_right_way_and_clips():
    ctl = pm.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)  # error +1.0, clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    up = ctl.value
    ctl.update(current_kl=6.6, n_steps=256)  # error +0.1, inside the clip
    assert ctl.value == pytest.approx(up * (1 + 0.1 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=256)  # error -1.0, clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 256 / 10_000))
    ctl.update(current_kl=6.0, n_steps=256)  # on target: no change
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 256 / 10_000))

    state = ctl.state_dict()
    other = pm.AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match="fixed"):
        other.load_state_dict(pm.FixedKLController(0.1).state_dict())


def test_fixed_kl_controller_stays():
    ctl = pm.FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = pm.FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --------------------------------------------------------------------------------------------
# Group advantages
# --------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = pm.group_advantages(scores, group_size=4)
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: all equal -> 0, not NaN
    a = 0.5 / (math.sqrt(1 / 3) + pm.GROUP_STD_EPS)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    adv_raw = pm.group_advantages(scores, group_size=4, normalize_std=False)
    torch.testing.assert_close(adv_raw, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 3"):
        pm.group_advantages(scores, group_size=3)


def test_rloo_advantages_by_hand():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0])
    adv = pm.rloo_advantages(scores, group_size=3)
    # 3 - (1+2)/2, 1 - (3+2)/2, 2 - (3+1)/2 | 0 - 3, 0 - 3, 6 - 0
    torch.testing.assert_close(adv, torch.tensor([1.5, -1.5, 0.0, -3.0, -3.0, 6.0]))
    with pytest.raises(ValueError, match=">= 2"):
        pm.rloo_advantages(scores, group_size=1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def test_clipped_value_loss_by_hand():
    # token 0: v=1, old=0, R=2, clip 0.2 -> v_clipped 0.2; (1-2)^2=1 < (0.2-2)^2=3.24 -> 3.24
    # token 1: v=0.1 inside the clip -> both 0.01
    values = torch.tensor([[1.0, 0.1, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = pm.clipped_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert stats["vf_clipfrac"] == pytest.approx(0.5)
    assert stats["value_mean"] == pytest.approx(0.55)


# --------------------------------------------------------------------------------------------
# From logits
# --------------------------------------------------------------------------------------------


def test_logprobs_from_logits_matches_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(pm.logprobs_from_logits(logits, labels), expected)
    low = pm.logprobs_from_logits(logits.bfloat16(), labels)
    assert low.dtype == torch.float32 and low.shape == (2, 5)
    expected_low = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, labels[..., None])
    torch.testing.assert_close(low, expected_low.squeeze(-1))


def test_entropy_from_logits():
    uniform = torch.zeros(3, 16)
    torch.testing.assert_close(pm.entropy_from_logits(uniform), torch.full((3,), math.log(16)))
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert float(pm.entropy_from_logits(peaked)) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 7, generator=g)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(pm.entropy_from_logits(logits), -(p * p.log()).sum(-1))


# ---- the reward model ----------------------------------------------------------------------


def test_bt_loss_matches_hand_computation():
    rc = torch.tensor([2.0, 0.5, -1.0])
    rr = torch.tensor([1.0, 1.5, -1.0])
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, -1, 0
    hand = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert float(pm.bt_loss(rc, rr)) == pytest.approx(hand, rel=1e-6)
    # The gradient pushes chosen up and rejected down by sigmoid(-d) / n.
    rc.requires_grad_(True)
    pm.bt_loss(rc, rr).backward()
    expect = [-1 / (1 + math.exp(d)) / 3 for d in (1.0, -1.0, 0.0)]
    assert rc.grad.tolist() == pytest.approx(expect, rel=1e-6)
    assert pm.pairwise_accuracy(rc.detach(), rr) == pytest.approx(1 / 3)


def test_expected_rating_and_concordance_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0]])
    bins = torch.tensor([1.0, 2.0, 3.0])
    # uniform -> 2; probabilities (3/5, 1/5, 1/5) -> 3/5 + 2/5 + 3/5 = 1.6
    assert pm.expected_rating(logits, bins).tolist() == pytest.approx([2.0, 1.6])
    assert pm.expected_rating(torch.tensor([[0.7], [-2.0]]), None).tolist() == pytest.approx(
        [0.7, -2.0])
    # ratings 1 < 2 < 3; predictions order (a, b) right, (a, c) right, (b, c) wrong -> 2/3
    assert pm.concordance(torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) == (
        pytest.approx(2 / 3))


def test_module_imports_only_torch():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(pm.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "torch"}, imported
