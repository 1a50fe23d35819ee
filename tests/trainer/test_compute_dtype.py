"""bfloat16 compute in the learner: the same numbers within bf16 rounding, float32 weights and
gradients (the optimizer never sees bf16), and a loss that really trains the adapter."""

from __future__ import annotations

import torch

from services.trainer.ppo.actor_critic import ActorCritic, make_batch


def _model(tiny_model_dir, dtype: str) -> ActorCritic:
    torch.manual_seed(0)
    model = ActorCritic(tiny_model_dir, lora_rank=8, lora_alpha=16, with_critic=True,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        compute_dtype=dtype)
    with torch.no_grad():  # a non-zero adapter, so the policy differs from the reference
        for p in model.adapter_parameters("policy"):
            p.normal_(0, 0.05)
    return model


def test_bfloat16_matches_float32_and_keeps_float32_gradients(tiny_model_dir):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (4, 7, 5)]
    completions = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (6, 3, 6)]
    fp32, bf16 = _model(tiny_model_dir, "float32"), _model(tiny_model_dir, "bfloat16")
    batch = make_batch(prompts, completions, fp32.pad_id)

    out = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        logp, entropy = model.policy_logprobs(batch)
        values = model.values(batch)
        ref = model.reference_logprobs(batch)
        assert logp.dtype == values.dtype == ref.dtype == torch.float32
        (-(logp * batch.response_mask).sum() + values.square().sum()).backward()
        # Every trainable tensor gets a float32 gradient, the critic's too (the reference pass
        # between its forward and backward must not freeze it).
        grads = [p.grad for p in model.trainable_parameters()]
        assert all(gr is not None and gr.dtype == torch.float32 for gr in grads)
        out[name] = (logp.detach(), ref, values.detach(), torch.cat([gr.flatten() for gr in grads]))

    mask = batch.response_mask.bool()
    for i, what in enumerate(("policy logprobs", "reference logprobs", "values")):
        diff = (out["fp32"][i] - out["bf16"][i])[mask].abs().max().item()
        assert diff < 0.05, (what, diff)  # bf16 keeps ~3 significant digits
    # The gradients point the same way (cosine), so bf16 steps train like fp32 ones.
    g32, g16 = out["fp32"][3], out["bf16"][3]
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0).item() > 0.98
    assert all(p.dtype == torch.float32 for p in bf16.trainable_parameters())
