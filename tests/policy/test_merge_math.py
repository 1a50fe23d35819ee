"""The merged-mode weight math on its own (no engine): W = W_base + scale * B @ A, computed in the
served dtype straight into the layer's buffer. The engine-level equality with HF + peft is in
tests/policy/test_merged.py (float32, the tiny model)."""

from __future__ import annotations

import torch

from services.policy.vllm_backend.merge import merge_into, merged


def _factors(out_features: int, in_features: int, rank: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, rank, generator=g) * 0.05
    a = torch.randn(rank, in_features, generator=g) * 0.05
    return base, (b, a, 2.0)


def test_float32_merge_is_base_plus_scaled_product():
    base, (b, a, scale) = _factors(96, 64)
    out = torch.empty_like(base)
    merge_into(out, base, (b, a, scale))
    torch.testing.assert_close(out, base + scale * (b @ a), rtol=1e-6, atol=1e-6)


def test_bfloat16_merge_is_within_one_bf16_step_of_the_float32_merge():
    base32, (b, a, scale) = _factors(192, 128, seed=1)
    exact = base32.to(torch.float64) + scale * (b.double() @ a.double())
    base16 = base32.bfloat16()  # the served base, as the worker caches it
    out = torch.empty_like(base16)
    merge_into(out, base16, (b, a, scale))  # float32 factors, cast on the way in
    assert out.dtype == torch.bfloat16
    # Rounding the base, the factors and the sum each cost at most half a bf16 step (2^-8
    # relative); all together stay within one step of the exact value, two near zero.
    step = exact.abs().clamp_min(2.0**-6) * 2.0**-7
    assert ((out.double() - exact).abs() <= 2 * step).all()
    # ...and the adapter really moved the weights: most entries differ from the base.
    assert (out != base16).float().mean() > 0.5


def test_a_module_the_adapter_leaves_alone_gets_the_base_back():
    base, _ = _factors(32, 16, seed=2)
    out = torch.full_like(base, float("nan"))  # a reused buffer still holds the last merge
    merge_into(out, base, None)
    assert torch.equal(out, base)


def test_merging_into_rows_of_a_fused_buffer_touches_only_those_rows():
    """q/k/v shards are written into their rows of one fused weight."""
    q, fq = _factors(48, 32, seed=3)
    k, _ = _factors(16, 32, seed=4)
    fused = torch.zeros(64, 32)
    merge_into(fused[:48], q, fq)
    merge_into(fused[48:], k, None)
    torch.testing.assert_close(fused[:48], merged(q, fq))
    assert torch.equal(fused[48:], k)


def test_a_float32_checkpoint_into_bf16_layers_is_merged_in_float32_and_rounded_once():
    """GPU hosts keep the base in float32 and merge on the CPU in float32 (their CPUs may lack
    bf16 instructions); the copy into the bf16 layer rounds once."""
    base32, (b, a, scale) = _factors(64, 48, seed=5)
    out = torch.empty(64, 48, dtype=torch.bfloat16)
    merge_into(out, base32, (b.bfloat16(), a.bfloat16(), scale))
    assert torch.equal(out, torch.addmm(base32, b.bfloat16().float(), a.bfloat16().float(),
                                        alpha=scale).bfloat16())
