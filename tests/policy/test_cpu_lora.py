"""The grouped CPU LoRA ops against vLLM's own PyTorch ops (same math, one matmul per adapter
slot instead of one mat-vec per token), and their handling of slot -1 (no adapter)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

from services.policy.vllm_backend import cpu_lora  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 5, 8, 48, 40


def _stacks(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen).to(dtype)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=gen).to(dtype)
    return a, b


INDICES = {
    "one adapter": [2] * 7,
    "three adapters": [0, 3, 3, 1, 0, 3, 1],
    "one token": [4],
}


@pytest.mark.parametrize("case", list(INDICES))
def test_shrink_and_expand_equal_vllms_ops(case):
    a, b = _stacks()
    idx = torch.tensor(INDICES[case])
    x = torch.randn(len(idx), HIDDEN).to(torch.bfloat16)

    ours, theirs = torch.full((len(idx), RANK), 7.0), torch.full((len(idx), RANK), 7.0)
    cpu_lora.bgmv_shrink(x, a, ours, idx, 0.5)
    torch_ops.bgmv_shrink(x, a, theirs, idx, 0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    for add in (True, False):
        y0 = torch.randn(len(idx), OUT).to(torch.bfloat16)
        ours_y, theirs_y = y0.clone(), y0.clone()
        cpu_lora.bgmv_expand(theirs, b, ours_y, idx, add)
        torch_ops.bgmv_expand(theirs, b, theirs_y, idx, add)
        torch.testing.assert_close(ours_y, theirs_y, rtol=2e-2, atol=2e-2)

        wide = torch.randn(len(idx), OUT * 3).to(torch.bfloat16)
        ours_w, theirs_w = wide.clone(), wide.clone()
        cpu_lora.bgmv_expand_slice(theirs, b, ours_w, idx, OUT, OUT, add)
        torch_ops.bgmv_expand_slice(theirs, b, theirs_w, idx, OUT, OUT, add)
        torch.testing.assert_close(ours_w, theirs_w, rtol=2e-2, atol=2e-2)
        # Columns outside the slice are untouched.
        assert torch.equal(ours_w[:, :OUT], wide[:, :OUT])
        assert torch.equal(ours_w[:, 2 * OUT:], wide[:, 2 * OUT:])


def test_prefill_ops_expand_per_sequence_indices():
    a, b = _stacks()
    seq_lens = torch.tensor([3, 1, 4])
    per_seq = torch.tensor([1, 4, 1])
    x = torch.randn(8, HIDDEN).to(torch.bfloat16)
    ours, theirs = torch.zeros(8, RANK), torch.zeros(8, RANK)
    meta = (torch.tensor([0, 3, 4]), seq_lens, per_seq, 3, 4, 8)
    cpu_lora.sgmv_shrink(x, a, ours, *meta, 2.0)
    torch_ops.sgmv_shrink(x, a, theirs, *meta, 2.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    y_ours, y_theirs = torch.zeros(8, OUT, dtype=torch.bfloat16), torch.zeros(
        8, OUT, dtype=torch.bfloat16)
    cpu_lora.sgmv_expand(theirs, b, y_ours, *meta, True)
    torch_ops.sgmv_expand(theirs, b, y_theirs, *meta, True)
    torch.testing.assert_close(y_ours, y_theirs, rtol=2e-2, atol=2e-2)


def test_slot_minus_one_adds_nothing():
    """Base-model tokens (slot -1) beside adapter tokens: vLLM's ops index the last slot with
    -1 and add its adapter; these add nothing (shrink writes 0, expand leaves the row)."""
    a, b = _stacks()
    idx = torch.tensor([-1, 2, -1, 0])
    x = torch.randn(4, HIDDEN).to(torch.bfloat16)
    buf = torch.full((4, RANK), 3.0)
    cpu_lora.bgmv_shrink(x, a, buf, idx, 1.0)
    assert torch.equal(buf[0], torch.zeros(RANK)) and torch.equal(buf[2], torch.zeros(RANK))
    assert buf[1].abs().sum() > 0
    expected_row1 = x[1].float() @ a[2, 0].float().T
    torch.testing.assert_close(buf[1], expected_row1, rtol=1e-5, atol=1e-5)

    y0 = torch.randn(4, OUT).to(torch.bfloat16)
    y = y0.clone()
    cpu_lora.bgmv_expand(torch.ones(4, RANK), b, y, idx, True)
    assert torch.equal(y[0], y0[0]) and torch.equal(y[2], y0[2])
    assert not torch.equal(y[1], y0[1])

    vllm_buf = torch.zeros(4, RANK)
    torch_ops.bgmv_shrink(x, a, vllm_buf, idx, 1.0)
    assert vllm_buf[0].abs().sum() > 0  # the bug these ops fix: slot -1 = the last slot

    # All tokens on the base model: nothing computed, nothing added.
    y = y0.clone()
    cpu_lora.bgmv_expand(torch.ones(4, RANK), b, y, torch.tensor([-1] * 4), True)
    assert torch.equal(y, y0)


def test_shapes_it_does_not_know_go_to_vllms_op():
    """vLLM broadcasts a single row over the output in this case; it keeps doing so."""
    _, b = _stacks()
    y_ours = torch.zeros(3, OUT, dtype=torch.bfloat16)
    y_theirs = y_ours.clone()
    x = torch.randn(1, RANK)
    cpu_lora.bgmv_expand(x, b, y_ours, torch.tensor([1]), True)
    torch_ops.bgmv_expand(x, b, y_theirs, torch.tensor([1]), True)
    assert torch.equal(y_ours, y_theirs)


def test_slot_groups():
    assert cpu_lora.slot_groups(torch.tensor([3, 3, 3])) == [(3, None)]
    assert cpu_lora.slot_groups(torch.tensor([-1, -1])) == []
    groups = cpu_lora.slot_groups(torch.tensor([1, -1, 0, 1]))
    assert [(s, r.tolist()) for s, r in groups] == [(0, [2]), (1, [0, 3])]


def test_a_slot_the_adapter_leaves_empty_is_skipped_and_rechecked_after_a_write():
    """vLLM zeroes the slot of a layer the adapter doesn't touch; writing the slot in place
    (loading another adapter there) must be seen."""
    a, b = _stacks()
    a[1].zero_()
    idx = torch.tensor([1, 1])
    x = torch.randn(2, HIDDEN).to(torch.bfloat16)
    buf = torch.full((2, RANK), 5.0)
    cpu_lora.bgmv_shrink(x, a, buf, idx, 1.0)
    assert torch.equal(buf, torch.zeros(2, RANK))
    a[1, 0].copy_(a[2, 0])  # in place, as vLLM's set_lora does
    cpu_lora.bgmv_shrink(x, a, buf, idx, 1.0)
    torch.testing.assert_close(buf, x.float() @ a[2, 0].float().T, rtol=1e-5, atol=1e-5)


def _wrapper(token_ids: list[int], slot_ids: list[int | None]):
    """A real vLLM CPU punica wrapper for a decode step of these tokens (LoRA id per token, 0 =
    none), with its metadata updated through our hook (vLLM's update, then the groups)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    mapping = LoRAMapping(tuple(token_ids), tuple(token_ids), is_prefill=False)
    cpu_lora.update_metadata(wrapper, mapping, slot_ids, len(slot_ids), 1000)
    return wrapper


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [[7, 7, 7, 7, 7], [7, 0, 9, 9, 0], [0, 0, 0, 0, 0]])
def test_a_whole_layer_at_once_equals_vllms_per_slice_path(ids, dtype):
    """qkv-like layer (three slices of different widths), LoRA ids 7 and 9 in slots 1 and 3,
    0 = base model. vLLM's own add_lora_linear (with its own per-token ops) is the reference;
    its last slot stays empty, as the engine keeps it, so that vLLM's slot -1 adds zeros."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    assert PunicaWrapperCPU.add_lora_linear is not cpu_lora.add_lora_linear  # not patched here
    gen = torch.Generator().manual_seed(1)
    slices = (32, 16, 16)
    a = tuple(torch.randn(5, 1, RANK, HIDDEN, generator=gen).to(dtype) for _ in slices)
    b = tuple(torch.randn(5, 1, size, RANK, generator=gen).to(dtype) for size in slices)
    for t in a + b:
        t[4].zero_()
    b[1][3].zero_()  # adapter 9 leaves the second slice alone
    wrapper = _wrapper(ids, [None, 7, None, 9, None])
    x = torch.randn(len(ids), HIDDEN, generator=gen).to(dtype)
    y0 = torch.randn(len(ids), sum(slices), generator=gen).to(dtype)
    ours, theirs = y0.clone(), y0.clone()
    cpu_lora.add_lora_linear(wrapper, ours, x, a, b, 1.0, slices)
    PunicaWrapperCPU.add_lora_linear(wrapper, theirs, x, a, b, 1.0, slices)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for row, lora_id in enumerate(ids):
        if lora_id == 0:  # base-model tokens are left alone
            assert torch.equal(ours[row], y0[row])


def test_the_built_layer_follows_writes_to_the_slot():
    """vLLM loads another adapter into a slot in place: the next step must use it."""
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(2, 1, RANK, HIDDEN, generator=gen),)
    b = (torch.randn(2, 1, OUT, RANK, generator=gen),)
    wrapper = _wrapper([5, 5], [5, None])
    x = torch.randn(2, HIDDEN, generator=gen)
    first = torch.zeros(2, OUT)
    cpu_lora.add_lora_linear(wrapper, first, x, a, b, 1.0, (OUT,))
    a[0][0, 0].mul_(2.0)
    second = torch.zeros(2, OUT)
    cpu_lora.add_lora_linear(wrapper, second, x, a, b, 1.0, (OUT,))
    torch.testing.assert_close(second, 2 * first, rtol=1e-5, atol=1e-5)
    b[0][0].zero_()  # the slot now holds nothing for this layer
    third = torch.ones(2, OUT)
    cpu_lora.add_lora_linear(wrapper, third, x, a, b, 1.0, (OUT,))
    assert torch.equal(third, torch.ones(2, OUT))


def test_a_write_to_another_slot_keeps_what_was_built_for_this_one():
    gen = torch.Generator().manual_seed(3)
    a = (torch.randn(3, 1, RANK, HIDDEN, generator=gen),)
    b = (torch.randn(3, 1, OUT, RANK, generator=gen),)
    built = cpu_lora._fused(a, b, (OUT,), 0, torch.float32)
    a[0][1].normal_(generator=gen)  # another adapter loaded into slot 1
    assert cpu_lora._fused(a, b, (OUT,), 0, torch.float32) is built
    a[0][0].normal_(generator=gen)
    rebuilt = cpu_lora._fused(a, b, (OUT,), 0, torch.float32)
    assert rebuilt is not built
    torch.testing.assert_close(rebuilt[1][0], a[0][0, 0].T)


def test_with_slot_writes_counted_only_a_write_to_this_slot_rebuilds_it(monkeypatch):
    """In the engine, vLLM's slot writes are counted (count_slot_writes): a write to another
    slot keeps what was built without comparing weights; a write to this one rebuilds it."""
    monkeypatch.setattr(cpu_lora, "_SLOT_WRITES", {})
    gen = torch.Generator().manual_seed(4)
    a = (torch.randn(3, 1, RANK, HIDDEN, generator=gen),)
    b = (torch.randn(3, 1, OUT, RANK, generator=gen),)
    built = cpu_lora._fused(a, b, (OUT,), 0, torch.float32)
    a[0][1].normal_(generator=gen)
    cpu_lora._SLOT_WRITES[1] = 1
    assert cpu_lora._fused(a, b, (OUT,), 0, torch.float32) is built
    a[0][0].normal_(generator=gen)
    cpu_lora._SLOT_WRITES[0] = 1
    rebuilt = cpu_lora._fused(a, b, (OUT,), 0, torch.float32)
    assert rebuilt is not built
    torch.testing.assert_close(rebuilt[1][0], a[0][0, 0].T)


def test_without_this_steps_groups_the_layer_goes_to_vllms_path():
    """A wrapper whose metadata vLLM updated without our hook (or a token count that doesn't
    match it) takes vLLM's own add_lora_linear: same result as calling it directly."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    gen = torch.Generator().manual_seed(4)
    a = (torch.randn(3, 1, RANK, HIDDEN, generator=gen),)
    b = (torch.randn(3, 1, OUT, RANK, generator=gen),)
    for t in a + b:
        t[2].zero_()
    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    wrapper.update_metadata(LoRAMapping((5, 5, 5), (5, 5, 5)), [5, None, None], 3, 1000)
    x = torch.randn(3, HIDDEN, generator=gen)
    ours, theirs = torch.zeros(3, OUT), torch.zeros(3, OUT)
    cpu_lora.add_lora_linear(wrapper, ours, x, a, b, 1.0, (OUT,))
    PunicaWrapperCPU.add_lora_linear(wrapper, theirs, x, a, b, 1.0, (OUT,))
    torch.testing.assert_close(ours, theirs)
    assert ours.abs().sum() > 0
