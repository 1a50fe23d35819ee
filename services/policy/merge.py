"""merged adapter mode: fold a LoRA adapter into the served base weights in place.

Runs inside the vLLM worker (through `collective_rpc`), so only paths cross the boundary, never
tensors (DESIGN.md: raw tensors in collective_rpc kwargs kill the engine). Only the modules the
adapter touches are rewritten: W = W_base + scale * B @ A, scale = alpha / r (alpha / sqrt(r) with
rsLoRA). Modules changed by the previous merge and not by this one get their base weights back.

Two ways in. The fast one rebuilds each touched linear layer directly: its fused weight is the
concatenation of its checkpoint shards (q/k/v -> qkv_proj, in the model's packed_modules_mapping
order, tensor parallel size 1), handed to the layer and, on CPU, re-packed the way vLLM packs it
after loading. Anything that path does not recognise (quantized layers, shapes that don't add
up, tensor parallelism) goes through vLLM's generic `reload_weights`, which is 3-5x slower.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

log = logging.getLogger("rlhf.policy.merge")


def lora_factors(adapter_dir: Path) -> dict[str, tuple[object, object, float]]:
    """Module path -> (B, A, scale) as float32, so that delta W = scale * B @ A."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    alpha = cfg.get("lora_alpha", cfg["r"])
    pairs: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value.float()
    factors = {}
    for module, ab in pairs.items():
        r = ab["A"].shape[0]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        factors[module] = (ab["B"], ab["A"], scale)
    return factors


def merged_weight(base, factors) -> object:
    """base + scale * B @ A in float32 (one fused op), left in float32: it is rounded once, when
    it is written into the served layer's dtype. base itself when the adapter leaves the
    module alone (factors None)."""
    import torch

    if factors is None:
        return base
    b, a, scale = factors
    return torch.addmm(base.float(), b, a, alpha=scale)


def _base_weights(inner, base_dir: str, modules: set[str]) -> dict[str, object]:
    """Checkpoint weights of `modules` (module path -> tensor), cached on the worker: a merge
    reads only the shards it has not read before."""
    from safetensors import safe_open

    cache: dict[str, object] = inner.__dict__.setdefault("_rlhf_base_weights", {})
    missing = {m for m in modules if m not in cache}
    if missing:
        for file in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    module = key[: -len(".weight")] if key.endswith(".weight") else None
                    if module in missing:
                        cache[module] = f.get_tensor(key)
    return {m: cache[m] for m in modules if m in cache}


def _fused_targets(model, modules: set[str]) -> dict[str, list[str]]:
    """vLLM layer path -> its checkpoint shards in order, for every layer holding one of
    `modules` (a module vLLM doesn't fuse is its own layer)."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    shard_of = {shard: fused for fused, shards in packed.items() for shard in shards}
    layers: dict[str, list[str]] = {}
    for module in modules:
        parent, leaf = module.rsplit(".", 1) if "." in module else ("", module)
        fused = shard_of.get(leaf)
        if fused is None:
            layers[module] = [module]
        else:
            prefix = f"{parent}." if parent else ""
            layers[f"{prefix}{fused}"] = [f"{prefix}{s}" for s in packed[fused]]
    return layers


def _swap_in_place(model, targets: dict[str, list[str]], weights: dict[str, object]) -> bool:
    """Builds every new layer weight first, then assigns them all: either every layer changes
    or none does. Returns False (nothing changed) when a layer is not one this path knows."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    staged = []
    for name, shards in targets.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            return False
        if not isinstance(layer, LinearBase) or not isinstance(
                layer.quant_method, UnquantizedLinearMethod):
            return False
        if any(s not in weights for s in shards):
            return False
        expected = (sum(getattr(layer, "output_partition_sizes", [layer.output_size])),
                    layer.input_size_per_partition
                    if hasattr(layer, "input_size_per_partition") else layer.input_size)
        parts = [weights[s] for s in shards]
        if (any(w.dim() != 2 or w.shape[1] != expected[1] for w in parts)
                or sum(w.shape[0] for w in parts) != expected[0]):
            return False
        # One pass per shard from the merged float32 result into the layer's dtype, straight
        # into its rows of the fused weight (a cast then a cat is two more passes).
        fused = torch.empty(expected, dtype=layer.params_dtype)
        row = 0
        for w in parts:
            fused[row: row + w.shape[0]].copy_(w)
            row += w.shape[0]
        if not on_cpu and tuple(layer.weight.shape) != tuple(fused.shape):
            return False
        staged.append((layer, fused))
    for layer, fused in staged:
        if on_cpu:
            # vLLM packs CPU weights for oneDNN/AMX after loading and drops the plain tensor;
            # give the layer its new weight and let the same dispatch pack it again.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            layer.weight = torch.nn.Parameter(fused, requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        else:
            layer.weight.data.copy_(fused.to(layer.weight.device))
    return True


def reload_merged(worker, base_dir: str, adapter_dir: str | None,
                  in_place: bool = True) -> list[str]:
    """Worker-side: merge adapter_dir into the base weights of the served model (None = base).
    Returns the checkpoint weight names rewritten. in_place=False takes vLLM's generic path."""
    inner = getattr(worker, "worker", worker)
    runner = inner.model_runner
    model = runner.get_model()
    lora = lora_factors(Path(adapter_dir)) if adapter_dir else {}
    previous: set[str] = getattr(inner, "_rlhf_merged_modules", set())
    targets = _fused_targets(model, set(lora) | previous)
    # Fused layers are rewritten whole, so their untouched shards are needed too (base values).
    shards = {s for group in targets.values() for s in group}
    base = _base_weights(inner, base_dir, shards)
    if set(lora) - set(base):
        raise ValueError(f"base model has no weights for {sorted(set(lora) - set(base))}")
    weights = {m: merged_weight(w, lora.get(m)) for m, w in base.items()}
    tp = getattr(inner, "parallel_config", None)
    if in_place and (tp is None or tp.tensor_parallel_size == 1) and _swap_in_place(
            model, targets, weights):
        inner._rlhf_merged_modules = set(lora)
        return sorted(f"{m}.weight" for m in weights)
    if in_place:
        log.warning("merged mode: these layers are rebuilt through vLLM's slower reload_weights")
    # vLLM processes a fused layer only once all its shards arrive, so every weight of a
    # touched block goes in, untouched ones with their base values.
    blocks = {m.rsplit(".", 1)[0] for m in shards}
    everything = _base_weights(inner, base_dir, _block_modules(base_dir, blocks))
    items = [(f"{m}.weight", weights.get(m, w)) for m, w in everything.items()]
    runner.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)
    inner._rlhf_merged_modules = set(lora)
    return sorted(k for k, _ in items)


def _block_modules(base_dir: str, blocks: set[str]) -> set[str]:
    from safetensors import safe_open

    found = set()
    for file in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight") and key[: -len(".weight")].rsplit(".", 1)[0] in blocks:
                    found.add(key[: -len(".weight")])
    return found
