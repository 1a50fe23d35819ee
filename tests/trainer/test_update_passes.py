"""The learner's update does no pass it does not need, and its memory options change nothing but
memory: each variant below makes the same update as the plain sequence of passes (a no-grad pass
for every row's old logprobs, the reference pass whatever the KL coefficient, whole minibatches,
activations kept), on a fixed global batch of the tiny model, and counts its passes.

Tolerance: reusing the first training forward's logprobs and skipping the unused reference pass
give the same numbers bit for bit on the CPU (the same kernels on the same rows); micro batches
add the same terms in another order, so the tolerance of the data-parallel test (test_ddp.py)
holds: every weight within 1e-4, 1e-7 on average.
"""

from __future__ import annotations

import pytest
import torch

from services.trainer import rl_math
from services.trainer.distributed import World
from services.trainer.ppo.learner import Learner
from services.trainer.ppo.update import Update
from tests.trainer.test_ddp import MAX_ABS, MEAN_ABS, _rollouts, _settings, _trained

ROWS = {"ppo": (5, 1), "grpo": (3, 2), "rloo": (3, 2)}  # prompts x samples per prompt


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step(model_dir, root, algo: str, plain: bool = False, **overrides):
    """(weights before, weights after, figures) of one update of `algo` on the fixed batch."""
    n_prompts, per_prompt = ROWS[algo]
    settings = _settings(model_dir, root, algo, per_prompt).model_copy(update=overrides)
    learner = Learner(settings, world_=World())
    learner._build()
    if plain:
        learner.update = Update(settings, learner.model, learner.optimizer, learner.kl_ctl,
                                learner.world, reuse_forwards=False)
    before = _trained(learner)
    stats = learner.update(_rollouts(n_prompts, per_prompt))
    return before, _trained(learner), stats, learner


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].reshape(-1) for k in sorted(weights)])


def assert_same_update(a, b, exact: bool = False) -> None:
    before, after = flat(a[0]), flat(a[1])
    assert (after - before).abs().mean() > 1e-4  # the step moved the weights (lr 1e-3)
    diff = (flat(b[1]) - after).abs()
    if exact:
        assert torch.equal(flat(b[1]), after), (diff.max(), diff.mean())
    else:
        assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (diff.max(), diff.mean())


def passes(stats: dict) -> dict[str, float]:
    return {k.split("/", 1)[1]: pytest.approx(v) for k, v in stats.items()
            if k.startswith("passes/")}


# One epoch over one minibatch, no KL penalty: every row goes through the policy once (its
# training forward), through the critic twice for PPO (old values, then training).
@pytest.mark.parametrize(("algo", "expected"), [
    ("ppo", dict(forward_policy=1, forward_ref=0, forward_value=2, backward_policy=1,
                 backward_value=1)),
    ("grpo", dict(forward_policy=1, forward_ref=0, forward_value=0, backward_policy=1,
                  backward_value=0)),
    ("rloo", dict(forward_policy=1, forward_ref=0, forward_value=0, backward_policy=1,
                  backward_value=0)),
])
def test_one_epoch_takes_the_old_logprobs_from_the_training_forward(tiny_model_dir, tmp_path,
                                                                    algo, expected):
    one_pass = dict(ppo_epochs=1, minibatch_size=64, kl_coef=0.0)
    plain = step(tiny_model_dir, tmp_path, algo, plain=True, **one_pass)
    lean = step(tiny_model_dir, tmp_path, algo, **one_pass)
    assert_same_update(plain, lean, exact=True)
    assert passes(plain[2]) == {**expected, "forward_policy": 2, "forward_ref": 1}
    assert passes(lean[2]) == expected
    # The figures that read the old logprobs of every row are the same too.
    for key in ("policy/entropy", "policy/logprob_mismatch", "loss/policy", "kl/approx",
                "policy/clipfrac", "loss/value"):
        assert lean[2][key] == pytest.approx(plain[2][key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_several_epochs_reuse_the_first_minibatchs_forward_only(tiny_model_dir, tmp_path, algo):
    # 2 epochs of minibatches of 4 rows: only the first minibatch's rows are trained before
    # the weights move, so only their old logprobs come from a training forward.
    plain = step(tiny_model_dir, tmp_path, algo, plain=True, kl_coef=0.0)
    lean = step(tiny_model_dir, tmp_path, algo, kl_coef=0.0)
    assert_same_update(plain, lean, exact=True)
    n = ROWS[algo][0] * ROWS[algo][1]  # rows of the batch
    assert passes(lean[2])["forward_policy"] == pytest.approx(2 + (n - 4) / n)
    assert passes(plain[2])["forward_policy"] == pytest.approx(3)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_kl_penalty_keeps_the_reference_pass(tiny_model_dir, tmp_path, algo):
    plain = step(tiny_model_dir, tmp_path, algo, plain=True, ppo_epochs=1, minibatch_size=64)
    lean = step(tiny_model_dir, tmp_path, algo, ppo_epochs=1, minibatch_size=64)
    assert_same_update(plain, lean, exact=True)
    assert passes(lean[2])["forward_ref"] == 1
    assert lean[2]["kl/ref"] == pytest.approx(plain[2]["kl/ref"], abs=1e-9)
    # PPO's per-token rewards need every row's old logprobs before its first loss: the
    # separate pass stays; GRPO's loss does not, so its pass goes.
    assert passes(lean[2])["forward_policy"] == (2 if algo == "ppo" else 1)


def test_no_kl_coefficient_no_reference_pass_and_no_kl_figure(tiny_model_dir, tmp_path):
    lean = step(tiny_model_dir, tmp_path, "grpo", kl_coef=0.0)
    assert passes(lean[2])["forward_ref"] == 0
    assert "kl/ref" not in lean[2]  # not measured, rather than a made-up 0
    # An adaptive controller needs the measured KL, even from a coefficient of 0.
    adaptive = step(tiny_model_dir, tmp_path, "grpo", kl_coef=0.0, target_kl=0.1)
    assert passes(adaptive[2])["forward_ref"] == 1 and "kl/ref" in adaptive[2]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_the_kl_estimate_is_computed_once_per_step(tiny_model_dir, tmp_path, algo, monkeypatch):
    calls = []
    real = rl_math.approx_kl

    in_loss = []  # GRPO's KL term in the loss: one call per micro batch, with gradients

    def counted(*args, **kwargs):
        (in_loss if args[1].requires_grad else calls).append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(rl_math, "approx_kl", counted)
    before, after, stats, learner = step(tiny_model_dir, tmp_path, algo, ppo_epochs=1)
    assert calls == ["k1"]
    if algo == "grpo":
        assert in_loss and set(in_loss) == {"k1"}
    else:
        assert in_loss == []
    # ... and it is the reference KL the step reports, on the policy before the update.
    model = learner.model
    samples = _rollouts(*ROWS[algo])
    from services.trainer.ppo.actor_critic import make_batch

    batch = make_batch([x.prompt_ids for x in samples], [x.completion_ids for x in samples],
                       model.pad_id)
    with torch.no_grad():
        state = dict(model.named_parameters())
        for name, value in before.items():
            state[name].copy_(value)
        old, _ = model.policy_logprobs(batch)
        ref = model.reference_logprobs(batch)
    expected = (real("k1", old, ref) * batch.response_mask).sum(-1).mean()
    assert stats["kl/ref"] == pytest.approx(float(expected), rel=1e-5, abs=1e-9)


def watched(model_dir, root, algo: str, **overrides):
    """A learner whose model records the rows of every pass and how often decoder layer 0 runs
    with gradients on; (learner, rows per pass, layer runs)."""
    n_prompts, per_prompt = ROWS[algo]
    settings = _settings(model_dir, root, algo, per_prompt).model_copy(update=overrides)
    learner = Learner(settings, world_=World())
    learner._build()
    rows: list[int] = []
    for name in ("policy_logprobs", "reference_logprobs", "values"):
        real = getattr(learner.model, name)

        def sized(batch, *args, real=real, **kwargs):
            rows.append(batch.input_ids.shape[0])
            return real(batch, *args, **kwargs)

        setattr(learner.model, name, sized)
    runs = {"with_grad": 0}
    layer = learner.model.model.get_base_model().get_decoder().layers[0]
    layer.register_forward_pre_hook(
        lambda *_: runs.__setitem__("with_grad", runs["with_grad"] + torch.is_grad_enabled()))
    return learner, rows, runs


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_make_the_same_update(tiny_model_dir, tmp_path, algo, micro):
    whole = step(tiny_model_dir, tmp_path, algo)
    split = step(tiny_model_dir, tmp_path, algo, micro_batch_size=micro)
    assert_same_update(whole, split)
    for key in ("loss/policy", "loss/value", "policy/clipfrac", "kl/approx", "policy/entropy"):
        assert split[2][key] == pytest.approx(whole[2][key], rel=1e-4, abs=1e-7), key
    assert passes(split[2]) == passes(whole[2])

    learner, rows, _ = watched(tiny_model_dir, tmp_path, algo, micro_batch_size=micro)
    learner.update(_rollouts(*ROWS[algo]))
    assert rows and max(rows) == micro  # no pass over more rows than a micro batch


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_gradient_checkpointing_makes_the_same_update(tiny_model_dir, tmp_path, algo):
    runs, results = {}, {}
    for checkpointing in (False, True):
        learner, _, runs[checkpointing] = watched(tiny_model_dir, tmp_path, algo,
                                                  gradient_checkpointing=checkpointing)
        before = _trained(learner)
        stats = learner.update(_rollouts(*ROWS[algo]))
        results[checkpointing] = (before, _trained(learner), stats)
    # Recomputing runs the same kernels on the same inputs: the same numbers on the CPU.
    assert_same_update(results[False], results[True], exact=True)
    # The layer ran again in every backward pass: twice as often with gradients on.
    assert runs[False]["with_grad"] > 0
    assert runs[True]["with_grad"] == 2 * runs[False]["with_grad"]


def test_each_step_reports_its_peak_memory(tiny_model_dir, tmp_path):
    stats = step(tiny_model_dir, tmp_path, "grpo")[2]
    # The CPU figure is the process's peak resident set: at least the tiny model and torch.
    assert 0.05 < stats["memory/peak_gb"] < 1000
