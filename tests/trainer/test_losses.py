"""services/trainer/losses.py: each loss and correction against values computed by hand on small
tensors (the arithmetic is in the comments), their gradients, and the property the learner's
micro batches rely on (losses of parts weighted by `row_weights` add up to the whole's)."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer import losses as L
from services.trainer.rl_math import masked_mean


def _ragged_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()  # [B, T]


def _batch():
    """Two sequences: ratios [1.5, 0.9 | pad] with A = +1, and [1.2, 1.0, 0.5] with A = -1."""
    old_logp = torch.log(torch.full((2, 3), 0.5))
    logp = torch.log(torch.tensor([[0.75, 0.45, 0.01], [0.6, 0.5, 0.25]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, 100.0], [-1.0, -1.0, -1.0]])  # 100: padding, ignored
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logp, old_logp, advantages, mask


# Per-token terms with clip 0.2 / 0.2, max(-A r, -A clip(r, 0.8, 1.2)):
#   row 0: r 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r 0.9 -> -0.9
#   row 1: r 1.2 -> 1.2; r 1.0 -> 1.0; r 0.5 -> max(0.5, 0.8) = 0.8 (clipped)
TERMS = [[-1.2, -0.9], [1.2, 1.0, 0.8]]


def test_dapo_is_the_token_mean_with_zero_gradient_on_clipped_tokens():
    logp, old, adv, mask = _batch()
    loss, stats = L.dapo_loss(logp, old, adv, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.2 + 1.0 + 0.8) / 5)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    assert stats["ratio_max"] == pytest.approx(1.5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.9 + 1.2 + 1.0 + 0.5) / 5)
    loss.backward()
    # d(-A r)/dlogp = -A r, over 5 tokens; clipped tokens and padding get nothing
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9 / 5, 0.0],
                                                        [1.2 / 5, 1.0 / 5, 0.0]]))


def test_dapo_two_tokens_by_hand_and_approx_kl():
    # token 0: ratio 1.5, A = +1 -> -1.2 (clipped at 1.2); token 1: ratio 0.9, A = -2 -> 1.8
    old_logp = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.75, 0.45, 0.01]])).requires_grad_()
    advantages = torch.tensor([[1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = L.dapo_loss(logp, old_logp, advantages, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.8) / 2)
    assert stats["approx_kl"] == pytest.approx(((0.5 - math.log(1.5)) + (-0.1 - math.log(0.9)))
                                               / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.9, 0.0]]))


def test_grpo_averages_each_sequence_then_the_sequences():
    logp, old, adv, mask = _batch()
    loss, _ = L.grpo_loss(logp, old, adv, mask, 0.2, 0.2)
    # row 0: (-1.2 - 0.9) / 2 = -1.05; row 1: 3.0 / 3 = 1.0
    assert loss.item() == pytest.approx((-1.05 + 1.0) / 2, abs=1e-6)
    loss.backward()
    # a token's gradient is -A r / (rows * its row's length)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9 / 4, 0.0],
                                                        [1.2 / 6, 1.0 / 6, 0.0]]))


def test_dr_grpo_divides_the_sum_by_a_constant():
    logp, old, adv, mask = _batch()
    loss, _ = L.dr_grpo_loss(logp, old, adv, mask, 0.2, 0.2, normaliser=4)
    assert loss.item() == pytest.approx(0.9 / (2 * 4))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9 / 8, 0.0],
                                                        [1.2 / 8, 1.0 / 8, 0.0]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        L.policy_loss("dr_grpo", logp, old, adv, mask, 0.2, 0.2)


def test_asymmetric_clipping():
    logp, old, adv, mask = _batch()
    # Clip-Higher 0.2 / 0.28: row 0's r 1.5 clips at 1.28 -> -1.28 instead of -1.2
    loss, _ = L.dapo_loss(logp, old, adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.9 + 1.2 + 1.0 + 0.8) / 5)
    # 0.1 below, 0.5 above: r 1.5 is inside [0.9, 1.5] (unclipped, gradient flows);
    # r 0.5 with A = -1 clips at 0.9 -> 0.9
    logp.grad = None
    loss, stats = L.dapo_loss(logp, old, adv, mask, 0.1, 0.5)
    assert loss.item() == pytest.approx((-1.5 - 0.9 + 1.2 + 1.0 + 0.9) / 5)
    assert stats["clipfrac"] == pytest.approx(1 / 5)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-1.5 / 5)
    assert logp.grad[1, 2].item() == 0.0


def test_gspo_clips_one_geometric_mean_ratio_per_sequence():
    logp, old, adv, mask = _batch()
    s0, s1 = math.sqrt(1.5 * 0.9), (1.2 * 1.0 * 0.5) ** (1 / 3)  # 1.1619, 0.8434
    seq = L.sequence_logratio(logp, old, mask)
    torch.testing.assert_close(seq.exp(), torch.tensor([s0, s1]))
    loss, stats = L.gspo_loss(logp, old, adv, mask, 0.2, 0.2)
    # both inside [0.8, 1.2]: the paper's 1/G sum_i -A_i s_i
    assert loss.item() == pytest.approx((-s0 + s1) / 2)
    assert stats["seq_ratio_mean"] == pytest.approx((s0 + s1) / 2)
    loss.backward()
    # d s_i / d logp_t = s_i / |y_i|: row 0: -s0 / 2 / 2, row 1: s1 / 3 / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 4, -s0 / 4, 0.0],
                                                        [s1 / 6, s1 / 6, s1 / 6]]))
    # upper clip 0.1: s0 = 1.16 > 1.1 with A > 0 -> row 0 is clipped whole, no gradient;
    # s1 = 0.84 stays inside [0.8, 1.1]
    logp.grad = None
    loss, stats = L.gspo_loss(logp, old, adv, mask, 0.2, 0.1)
    assert loss.item() == pytest.approx((-1.1 + s1) / 2)
    loss.backward()
    assert logp.grad[0].abs().sum().item() == 0.0
    assert stats["clipfrac"] == pytest.approx(2 / 5)  # row 0's two tokens


def test_cispo_weight_is_clipped_and_detached():
    logp, old, adv, mask = _batch()
    loss, stats = L.cispo_loss(logp, old, adv, mask, 0.2, 0.2)
    # weights clip(r, 0.8, 1.2): row 0 [1.2, 0.9], row 1 [1.2, 1.0, 0.8]
    expected = -(1.2 * math.log(0.75) + 0.9 * math.log(0.45)
                 - 1.2 * math.log(0.6) - 1.0 * math.log(0.5) - 0.8 * math.log(0.25)) / 5
    assert loss.item() == pytest.approx(expected)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    loss.backward()
    # d/dlogp of -sg[w] A logp = -w A: the weight's own dependence on logp adds nothing, and
    # the clipped tokens (r 1.5 and 0.5) keep a gradient, unlike PPO's clip
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.2 / 5, -0.9 / 5, 0.0],
                                                        [1.2 / 5, 1.0 / 5, 0.8 / 5]]))


def test_on_policy_every_loss_has_the_policy_gradient_of_its_aggregation():
    torch.manual_seed(0)
    mask = _ragged_mask([4, 2, 1], 4)
    adv = torch.randn(3)[:, None].expand(3, 4).contiguous()
    base = torch.randn(3, 4)
    for loss_type in L.LOSS_TYPES:
        logp = base.clone().requires_grad_()
        loss, stats = L.policy_loss(loss_type, logp, base.clone(), adv, mask, 0.2, 0.2,
                                    max_new_tokens=5)
        loss.backward()
        # at r = 1 every loss's gradient is that of -aggregate(A * logp)
        ref = base.clone().requires_grad_()
        L.aggregate(loss_type, -adv * ref, mask, 5).backward()
        torch.testing.assert_close(logp.grad, ref.grad, msg=loss_type)
        assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_parts_weighted_by_row_weights_add_up_to_the_whole(loss_type):
    """What the learner's micro batches (and ranks) rely on: each part's loss, weighted by its
    share of `row_weights`, sums to the whole batch's loss, also with the KL term's
    aggregation; a row with no tokens included."""
    torch.manual_seed(1)
    mask = _ragged_mask([5, 0, 3, 1, 4, 2], 5)
    logp, old = torch.randn(6, 5) * 0.3 - 2, torch.randn(6, 5) * 0.3 - 2
    adv, weight = torch.randn(6, 5), torch.rand(6, 5) * 2
    whole, _ = L.policy_loss(loss_type, logp, old, adv, mask, 0.2, 0.3, weight,
                             max_new_tokens=5)
    w = L.row_weights(loss_type, mask)
    summed = 0.0
    for part in ([0, 1], [2], [3, 4, 5]):
        at = torch.tensor(part)
        loss, _ = L.policy_loss(loss_type, logp[at], old[at], adv[at], mask[at], 0.2, 0.3,
                                weight[at], max_new_tokens=5)
        summed += loss.item() * float(w[at].sum() / w.sum())
    assert summed == pytest.approx(whole.item(), abs=1e-6)


def test_weight_multiplies_each_token_term():
    logp, old, adv, mask = _batch()
    weight = torch.tensor([[2.0, 0.0, 7.0], [1.0, 0.5, 1.0]])
    loss, _ = L.dapo_loss(logp, old, adv, mask, 0.2, 0.2, weight)
    assert loss.item() == pytest.approx((2 * -1.2 + 0 + 1.2 + 0.5 * 1.0 + 0.8) / 5)


def test_unknown_loss_type():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="unknown loss_type 'ppo2'"):
        L.policy_loss("ppo2", logp, old, adv, mask, 0.2, 0.2)


def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 3.0, 9.0], [4.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert L.token_mean(x, mask).item() == pytest.approx((1 + 3 + 4) / 3)
    assert L.sequence_mean(x, mask).item() == pytest.approx((2 + 4) / 2)  # empty row left out
    assert L.constant_normalised_sum(x, mask, 4).item() == pytest.approx(8 / (3 * 4))
    assert L.row_weights("dapo", mask).tolist() == [2, 1, 0]
    assert L.row_weights("grpo", mask).tolist() == [1, 1, 0]
    assert L.row_weights("dr_grpo", mask).tolist() == [1, 1, 1]


def test_tis_weighted_loss_by_hand():
    logp, old, adv, mask = _batch()
    behaviour = old - torch.tensor([[math.log(4.0), 0.0, 0.0], [0.0, 0.0, math.log(0.25)]])
    w = L.mismatch_weights("tis", old, behaviour, mask, 2.0)  # r: [4, 1 | -], [1, 1, 0.25]
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 0.25]]))
    loss, _ = L.dapo_loss(logp, old, adv, mask, 0.2, 0.2, w)
    assert loss.item() == pytest.approx((2 * -1.2 - 0.9 + 1.2 + 1.0 + 0.25 * 0.8) / 5)
    assert float(masked_mean(w, mask)) == pytest.approx((2 + 1 + 1 + 1 + 0.25) / 5)


# --------------------------------------------------------------------------------------------
# In the learner's update (tiny model, the fixed batch of test_ddp.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_each_loss_type_trains_without_a_reference_pass_at_kl_coef_0(tiny_model_dir, tmp_path,
                                                                     loss_type):
    """kl_coef 0 skips the reference pass whatever the loss; micro batches of one row give the
    update of whole minibatches (the loss's denominator is split by `row_weights`)."""
    from tests.trainer.test_update_passes import assert_same_update, passes, step

    whole = step(tiny_model_dir, tmp_path, "grpo", loss_type=loss_type, kl_coef=0.0,
                 ppo_epochs=1)
    assert passes(whole[2])["forward_ref"] == 0 and "kl/ref" not in whole[2]
    micro = step(tiny_model_dir, tmp_path, "grpo", loss_type=loss_type, kl_coef=0.0,
                 ppo_epochs=1, micro_batch_size=1)
    assert_same_update(whole, micro)
    assert whole[2]["mismatch/ratio_max"] >= whole[2]["mismatch/ratio_mean"] > 0


@pytest.mark.usefixtures("one_torch_thread")
def test_grpo_kl_term_uses_the_configured_estimator(tiny_model_dir, tmp_path, monkeypatch):
    from services.trainer import rl_math
    from tests.trainer.test_update_passes import flat, step

    in_loss = []
    real = rl_math.approx_kl

    def counted(kind, logp, ref_logp):
        if logp.requires_grad:
            in_loss.append(kind)
        return real(kind, logp, ref_logp)

    monkeypatch.setattr(rl_math, "approx_kl", counted)
    k2 = step(tiny_model_dir, tmp_path, "grpo", kl_estimator="k2", kl_coef=1.0, ppo_epochs=1)
    assert in_loss and set(in_loss) == {"k2"}
    k3 = step(tiny_model_dir, tmp_path, "grpo", kl_estimator="k3", kl_coef=1.0, ppo_epochs=1)
    assert set(in_loss) == {"k2", "k3"}
    assert not torch.equal(flat(k2[1]), flat(k3[1]))  # the estimator changes the update


def test_settings_of_the_loss_family():
    from rlhf.plumbing.config import ConfigError
    from services.trainer.ppo.settings import PPOSettings

    s = PPOSettings.load(None, algo="grpo", clip_range=0.3)
    assert (s.loss_type, s.mismatch_correction, s.mismatch_threshold) == ("dapo", "tis", 2.0)
    assert s.clip_bounds() == (0.3, 0.3)
    s = PPOSettings.load(None, algo="grpo", loss_type="gspo", clip_range_low=3e-4,
                         clip_range_high=4e-4)
    assert s.clip_bounds() == (3e-4, 4e-4)
    with pytest.raises(ConfigError, match="ppo keeps its clipped surrogate"):
        PPOSettings.load(None, algo="ppo", loss_type="gspo")
    with pytest.raises(ConfigError, match="mismatch_threshold"):
        PPOSettings.load(None, mismatch_threshold=1.0)
    with pytest.raises(ConfigError, match="loss_type"):
        PPOSettings.load(None, algo="grpo", loss_type="ppo")


def test_run_config_carries_the_loss_and_correction(tmp_path):
    from rlhf.plumbing.errors import InvalidArgument
    from rlhf.v1 import trainer_pb2
    from services.trainer.config import TrainerConfig
    from services.trainer.ppo.runs import settings_from_proto, settings_to_proto

    cfg = TrainerConfig.load(data_dir=tmp_path, policy_addr=["10.0.0.1:50051"],
                             reward_addr=["10.0.0.2:50052"], prompts=tmp_path / "p.jsonl")
    grpo = trainer_pb2.ALGORITHM_GRPO
    run = settings_from_proto(trainer_pb2.RunConfig(
        algorithm=grpo, loss_type="cispo", clip_range_low=0.5, clip_range_high=0.3,
        mismatch_correction="mis_seq", mismatch_threshold=3.0), cfg, "r1")
    assert (run.loss_type, run.clip_bounds(), run.mismatch_correction,
            run.mismatch_threshold) == ("cispo", (0.5, 0.3), "mis_seq", 3.0)
    back = settings_to_proto(run)
    assert (back.loss_type, back.clip_range_low, back.clip_range_high, back.mismatch_correction,
            back.mismatch_threshold) == ("cispo", 0.5, 0.3, "mis_seq", 3.0)
    default = settings_from_proto(trainer_pb2.RunConfig(algorithm=grpo), cfg, "r2")
    assert (default.loss_type, default.mismatch_correction) == ("dapo", "tis")
    for bad in (dict(loss_type="ppo2"), dict(mismatch_correction="is"),
                dict(mismatch_threshold=0.5), dict(clip_range_high=-1.0)):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            settings_from_proto(trainer_pb2.RunConfig(algorithm=grpo, **bad), cfg, "r3")
    with pytest.raises(InvalidArgument, match="ppo keeps its clipped surrogate"):
        settings_from_proto(trainer_pb2.RunConfig(loss_type="gspo"), cfg, "r4")
