"""LoRA ops for vLLM's CPU build that cost what the adapter costs, not what the batch costs.

vLLM's PyTorch-native punica ops (vllm/lora/ops/torch_ops, what its CPU build runs) copy every
token's adapter weights out of the stacked slots ((tokens, out, r) per slice, converted to the
compute dtype) and then do one mat-vec per token. A batch holds few distinct adapters, usually
one, so the ops here group the tokens by adapter slot and run one matmul per slot instead: the
same products, no per-token copies. Measured on SmolLM2 with an r=16 adapter: bench/adapter_speed.

They also fix what vLLM's ops do with slot -1 ("no adapter"): indexing with -1 picks the last
slot, so base-model tokens got the last slot's adapter whenever every slot was in use (the
mixed-batch bug in DESIGN.md). Here slot -1 contributes nothing.

Same signatures and dtype rules as vLLM's ops (shrink computes in its float32 buffer's dtype,
expand in the output's), so results match them to float rounding; calls whose shapes don't line
up one row per token are handed to vLLM's own op. `install` runs in the engine process (through
collective_rpc, like merge.py) and swaps these in for the names vLLM's CPU punica wrapper calls.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("rlhf.policy.cpu_lora")

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice",
        "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def slot_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) for every adapter slot used by `indices` (one per token), slot -1 left out;
    rows is None when every token uses that slot (the common case: no gathers at all)."""
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [(first, None)] if first >= 0 else []
    return [(slot, (indices == slot).nonzero().squeeze(1))
            for slot in torch.unique(indices).tolist() if slot >= 0]


def _slot_weight(stacked: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """One slot's (out, in) weight from vLLM's (slots, 1, out, in) or (slots, out, in) stack."""
    weight = stacked[slot]
    if weight.dim() == 3:
        weight = weight.squeeze(0)
    return weight.to(dtype)


# (address and shape of a stacked weight, slot) -> (its version counter when checked, whether
# the slot was non-zero). Views of one tensor share its version counter.
_USED: dict[tuple, tuple[int, bool]] = {}


def _slot_used(stacked: torch.Tensor, slot: int) -> bool:
    """Whether a slot holds weights for this layer. vLLM zeroes a slot's weights for layers the
    adapter doesn't touch (an adapter on q/k/v/o leaves the MLP's slots zero); skipping them is
    exact. vLLM writes slots in place, which bumps the tensor's version counter: re-checked
    then."""
    key = (stacked.data_ptr(), tuple(stacked.shape), slot)
    seen = _USED.get(key)
    if seen is not None and seen[0] == stacked._version:
        return seen[1]
    used = bool(stacked[slot].any())
    _USED[key] = (stacked._version, used)
    return used


def _fits(inputs: torch.Tensor, output: torch.Tensor, indices: torch.Tensor) -> bool:
    return (inputs.dim() == 2 and output.dim() == 2 and indices.dim() == 1
            and inputs.shape[0] == output.shape[0] == indices.shape[0])


def _apply(inputs, stacked, out_view, indices, scale: float, add: bool) -> None:
    """out_view (+)= scale * inputs @ W[slot].T, row by row per the token's slot; rows whose
    slot is -1 get 0 added (or are set to 0)."""
    dtype = out_view.dtype
    groups = [(slot, rows) for slot, rows in slot_groups(indices) if _slot_used(stacked, slot)]
    if not add and (len(groups) != 1 or groups[0][1] is not None):
        out_view.zero_()  # rows of base-model tokens, and the ones filled below anyway
    for slot, rows in groups:
        weight = _slot_weight(stacked, slot, dtype)
        x = inputs if rows is None else inputs.index_select(0, rows)
        product = x.to(dtype) @ weight[: out_view.shape[1]].T
        if scale != 1.0:
            product.mul_(scale)
        if rows is None:
            if add:
                out_view.add_(product)
            else:
                out_view.copy_(product)
        elif add:
            out_view.index_add_(0, rows, product)
        else:
            out_view.index_copy_(0, rows, product)


def _vllm_op(name: str):
    from vllm.lora.ops import torch_ops

    return getattr(torch_ops, name)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    if not _fits(inputs, output_tensor, lora_indices_tensor):
        return _vllm_op("bgmv_shrink")(inputs, lora_a_weights, output_tensor,
                                       lora_indices_tensor, scaling)
    rank = lora_a_weights.shape[-2]
    _apply(inputs, lora_a_weights, output_tensor[:, :rank], lora_indices_tensor, scaling,
           add=False)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    if not _fits(inputs, output_tensor, lora_indices_tensor):
        return _vllm_op("bgmv_expand")(inputs, lora_b_weights, output_tensor,
                                       lora_indices_tensor, add_inputs)
    # The adapter and the model may pad the output dimension differently (vLLM's rule).
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _apply(inputs, lora_b_weights, output_tensor[:, :width], lora_indices_tensor, 1.0,
           add=add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                      slice_offset, slice_size, add_inputs=True):
    if not _fits(inputs, output_tensor, lora_indices_tensor) or (
            lora_b_weights.shape[-2] != slice_size):
        return _vllm_op("bgmv_expand_slice")(inputs, lora_b_weights, output_tensor,
                                             lora_indices_tensor, slice_offset, slice_size,
                                             add_inputs)
    view = output_tensor[:, slice_offset: slice_offset + slice_size]
    _apply(inputs, lora_b_weights, view, lora_indices_tensor, 1.0, add=add_inputs)


def _per_token(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor,
                _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor,
                _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,
                      slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      _per_token(lora_indices_tensor, seq_len_tensor), slice_offset,
                      slice_size, add_inputs)


def install(worker=None) -> list[str]:
    """Engine side: make vLLM's CPU punica wrapper call these ops. Returns the names replaced
    (none off CPU, where vLLM runs its own kernels)."""
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    ours = globals()
    replaced = [name for name in _OPS if hasattr(punica_cpu, name)]
    for name in replaced:
        setattr(punica_cpu, name, ours[name])
    log.info("LoRA on CPU: grouped-by-adapter ops in place of %s", ", ".join(replaced))
    return replaced
