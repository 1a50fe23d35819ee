"""LoRA ops for vLLM's CPU build that cost what the adapter costs, not what the batch costs.

vLLM's PyTorch-native punica ops (vllm/lora/ops/torch_ops, what its CPU build runs) copy every
token's adapter weights out of the stacked slots ((tokens, out, r) per slice, converted to the
compute dtype) and then do one mat-vec per token. A batch holds few distinct adapters, usually
one, so the ops here group the tokens by adapter slot and run one matmul per slot instead: the
same products, no per-token copies. Two levels:

- the per-slice ops (same names and signatures as vLLM's), which vLLM's wrapper still calls for
  embeddings, logits and whatever doesn't go through add_lora_linear;
- add_lora_linear for whole linear layers (further down): one product per adapter for all the
  slices of a layer, with the token grouping computed once per step.

They also fix what vLLM's ops do with slot -1 ("no adapter"): indexing with -1 picks the last
slot, so base-model tokens get the last slot's adapter whenever every slot is in use (the
mixed-batch bug in DESIGN.md). Here slot -1 contributes nothing.

Same dtype rules as vLLM's ops, so results match them to float rounding; calls whose shapes
don't fit one row per token go to vLLM's own op. `install` runs in the engine process (through
collective_rpc, like merge.py) and swaps these in where vLLM's CPU punica wrapper looks them up.
Measured on SmolLM2 with an r=16 adapter: bench/adapter_speed.py (docs/policy.md).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("rlhf.policy.cpu_lora")

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice",
        "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
_METHODS = ("update_metadata", "add_lora_linear")  # of PunicaWrapperCPU


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


# ---------------------------------------------------------------- whole layers at once
#
# The per-slice ops above still cost ~8 small torch ops per layer and slice, and each one is an
# OpenMP region: on a CPU shared with the server and its clients that overhead, not the
# arithmetic, sets the step time at small batches. So a LoRA layer's update is done as one
# product per adapter in the batch: x @ A_cat.T @ B_diag.T, where A_cat stacks the slices' A
# (n*r, in) and B_diag holds each slice's B on the block diagonal (sum(out), n*r); built once
# per slot and layer, rebuilt when vLLM writes the slot. The token -> slot grouping is computed
# once per step, when vLLM updates the wrapper's metadata.

# (first A's address, slot, dtype) -> (versions of every A and B when checked, what was built,
# a copy of the slot's A and B it was built from (None when slot writes are counted), the
# slot's write count then)
_FUSED: dict[tuple, tuple] = {}
# slot -> how many times vLLM has written it (LoRAModelManager.activate_adapter, the only place
# it writes slots); None until install() counts them. While None, a changed version counter is
# told apart from a write to this slot by comparing weights.
_SLOT_WRITES: dict[int, int] | None = None
_ORIGINAL: dict[str, object] = {}
_UNKNOWN = object()  # a layer whose shapes the whole-layer path doesn't know
# Token counts up to this take the float32 path (measured on SmolLM2 shapes, 2-core AMX CPU:
# 5 tokens 15 us vs 51 us in bf16; 64 tokens about even; 512 tokens bf16 5x faster).
_FLOAT32_UP_TO = 32


def _fused(lora_a_stacked, lora_b_stacked, output_slices, slot: int, dtype):
    """((A_cat.T, B_diag.T) in the layer's dtype, the same in float32) for one slot of one
    layer; None when the slot is empty there, _UNKNOWN for shapes this path doesn't know."""
    key = (lora_a_stacked[0].data_ptr(), slot, dtype)
    versions = tuple(t._version for t in lora_a_stacked) + tuple(
        t._version for t in lora_b_stacked)
    seen = _FUSED.get(key)
    if seen is not None and seen[0] == versions:
        return seen[1]
    # The version counters are per tensor, so loading an adapter into any slot moves them for
    # every slot of the layer: a push would otherwise rebuild every slot in use, in the step
    # that first serves the new version. With slot writes counted that is one lookup; without,
    # this slot's weights are compared with what it was built from (~18 ms for SmolLM2 under
    # load, in that same step).
    writes = None if _SLOT_WRITES is None else _SLOT_WRITES.get(slot, 0)
    snapshot = None
    if writes is None:
        snapshot = [(a[slot], b[slot])
                    for a, b in zip(lora_a_stacked, lora_b_stacked, strict=True)]
    if seen is not None and _slot_unchanged(seen, snapshot, writes):
        _FUSED[key] = (versions, seen[1], seen[2], writes)
        return seen[1]
    if snapshot is not None:
        snapshot = [(now_a.clone(), now_b.clone()) for now_a, now_b in snapshot]
    a_parts, b_parts, offsets, offset = [], [], [], 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
        a_slot, b_slot = _slot_weight(a, slot, dtype), _slot_weight(b, slot, dtype)
        if b_slot.shape[0] != size or a_slot.shape[0] != b_slot.shape[1]:
            _FUSED[key] = (versions, _UNKNOWN, snapshot, writes)
            return _UNKNOWN
        if _slot_used(a, slot) and _slot_used(b, slot):
            a_parts.append(a_slot)
            b_parts.append(b_slot)
            offsets.append(offset)
        offset += size
    built = None
    if a_parts:
        # Built transposed, as add_lora_linear multiplies (one copy each, no transpose pass),
        # and in float32 too: see add_lora_linear.
        a_cat_t = torch.cat([part.T for part in a_parts], dim=1)
        b_diag_t = torch.zeros(a_cat_t.shape[1], offset, dtype=dtype)
        col = 0
        for b_slot, row in zip(b_parts, offsets, strict=True):
            b_diag_t[col: col + b_slot.shape[1], row: row + b_slot.shape[0]] = b_slot.T
            col += b_slot.shape[1]
        built = ((a_cat_t, b_diag_t), (a_cat_t.float(), b_diag_t.float()))
    _FUSED[key] = (versions, built, snapshot, writes)
    return built


def _slot_unchanged(seen: tuple, snapshot, writes: int | None) -> bool:
    """Whether a slot still holds what `seen` was built from: by its write count when vLLM's
    writes are counted, else by comparing its weights with the copy kept then."""
    if writes is not None:
        return seen[3] == writes
    return seen[2] is not None and all(
        torch.equal(now_a, then_a) and torch.equal(now_b, then_b)
        for (now_a, now_b), (then_a, then_b) in zip(snapshot, seen[2], strict=True))


def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
    """vLLM's, then the token -> slot groups for this step."""
    _vllm_method("update_metadata")(self, mapping, lora_index_to_id, max_loras, vocab_size,
                                    **kwargs)
    indices = self.token_lora_indices
    self._rlhf_groups = (indices.shape[0], slot_groups(indices))


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                    buffer=None, **kwargs):
    """y += scale * x @ A.T @ B.T per token's slot, for all slices of a layer at once."""
    groups = getattr(self, "_rlhf_groups", None)
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1]) if y.is_contiguous() else None
    ours = (groups is not None and y2 is not None and buffer is None
            and groups[0] == x2.shape[0] == y2.shape[0])
    built = [(slot, rows, _fused(lora_a_stacked, lora_b_stacked, output_slices, slot, y.dtype))
             for slot, rows in groups[1]] if ours else []
    if not ours or any(fused is _UNKNOWN for _, _, fused in built):
        return _vllm_method("add_lora_linear")(self, y, x, lora_a_stacked, lora_b_stacked,
                                               scale, output_slices, buffer=buffer, **kwargs)
    for _, rows, fused in built:
        if fused is None:
            continue
        xs = x2 if rows is None else x2.index_select(0, rows)
        if xs.shape[0] <= _FLOAT32_UP_TO:
            # A few tokens (decode steps): float32 matmuls are ~3x faster than bf16 at this
            # size on CPU (no oneDNN set-up per call), and at least as exact.
            a_t, b_t = fused[1]
            delta = (xs.float() @ a_t) @ b_t
        else:
            # In the output's dtype: vLLM rounds its float32 shrink result to that dtype
            # before the expand anyway, and the matmul accumulates in float32 either way.
            a_t, b_t = fused[0]
            delta = (xs.to(y.dtype) @ a_t) @ b_t
        if scale != 1.0:
            delta.mul_(scale)
        target = y2[:, : delta.shape[1]]
        if rows is None:
            target.add_(delta)
        else:
            target.index_add_(0, rows, delta.to(target.dtype))
    return None


def _vllm_method(name: str):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return _ORIGINAL.get(name) or getattr(PunicaWrapperCPU, name)


def install(worker=None) -> list[str]:
    """Engine side: make vLLM's CPU punica wrapper use these ops. Returns what was replaced
    (nothing off CPU, where vLLM runs its own kernels)."""
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    ours = globals()
    replaced = [name for name in _OPS if hasattr(punica_cpu, name)]
    for name in replaced:
        setattr(punica_cpu, name, ours[name])
    cls = punica_cpu.PunicaWrapperCPU
    for name in _METHODS:
        if name not in _ORIGINAL:
            _ORIGINAL[name] = getattr(cls, name)
            setattr(cls, name, ours[name])
        replaced.append(f"PunicaWrapperCPU.{name}")
    count_slot_writes()
    log.info("LoRA on CPU: grouped-by-adapter ops in place of %s", ", ".join(replaced))
    return replaced


def count_slot_writes() -> None:
    """Counts vLLM's writes to each slot, so that a write to one slot costs the others nothing
    (see _fused)."""
    global _SLOT_WRITES
    from vllm.lora.model_manager import LoRAModelManager

    if "activate_adapter" in _ORIGINAL:
        return
    original = _ORIGINAL["activate_adapter"] = LoRAModelManager.activate_adapter

    def activate_adapter(self, lora_id: int) -> bool:
        written = original(self, lora_id)
        if written:  # it wrote every LoRA layer's slot for this adapter (or zeroed it)
            slot = self.lora_index_to_id.index(lora_id)
            _SLOT_WRITES[slot] = _SLOT_WRITES.get(slot, 0) + 1
        return written

    LoRAModelManager.activate_adapter = activate_adapter
    _SLOT_WRITES = {}


def installed(worker=None) -> list[str]:
    """Engine side: which of vLLM's CPU LoRA entry points are ours now (and whether slot
    writes are counted)."""
    from vllm.lora.punica_wrapper import punica_cpu

    ours = [name for name in _OPS if getattr(punica_cpu, name, None) is globals()[name]]
    ours += [f"PunicaWrapperCPU.{name}" for name in _METHODS
             if getattr(punica_cpu.PunicaWrapperCPU, name) is globals()[name]]
    if _SLOT_WRITES is not None:
        ours.append("LoRAModelManager.activate_adapter")
    return ours
