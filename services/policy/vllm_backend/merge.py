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
from pathlib import Path

from rlhf.formats import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from services.policy.adapters.checks import LORA_KEY_RE

log = logging.getLogger("rlhf.policy.merge")


def lora_factors(adapter_dir: Path) -> dict[str, tuple[object, object, float]]:
    """Module path -> (B, A, scale) as float32, so that delta W = scale * B @ A."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    alpha = cfg.get("lora_alpha", cfg["r"])
    pairs: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        m = LORA_KEY_RE.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value.float()
    factors = {}
    for module, ab in pairs.items():
        r = ab["A"].shape[0]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        factors[module] = (ab["B"], ab["A"], scale)
    return factors


def merge_into(out, base, factors) -> None:
    """out = base + scale * B @ A; base itself when the adapter leaves the module alone (factors
    None). On CPU the base is cached in the served dtype and this is one fused op in it: in
    bfloat16 the product is accumulated in float32 and the sum rounded once, within one bf16
    step of a float32 merge (the served base is rounded to bf16 anyway). A base in another dtype
    (float32, kept on GPU hosts) is merged in float32 and rounded on the copy."""
    import torch

    if factors is None:
        out.copy_(base)
        return
    b, a, scale = factors
    if base.dtype == out.dtype:
        torch.addmm(base, b.to(base.dtype), a.to(base.dtype), alpha=scale, out=out)
    else:
        out.copy_(torch.addmm(base.float(), b.float(), a.float(), alpha=scale))


def _base_weights(inner, base_dir: str, modules: set[str], dtype=None) -> dict[str, object]:
    """Checkpoint weights of `modules` (module path -> tensor), cast to `dtype` when given and
    cached on the worker: a merge reads only the shards it has not read before."""
    from safetensors import safe_open

    caches = inner.__dict__.setdefault("_rlhf_base_weights", {})
    cache: dict[str, object] = caches.setdefault(dtype, {})
    missing = {m for m in modules if m not in cache}
    if missing:
        for file in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    module = key[: -len(".weight")] if key.endswith(".weight") else None
                    if module in missing:
                        tensor = f.get_tensor(key)
                        cache[module] = tensor if dtype is None else tensor.to(dtype)
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


def merged(base, factors) -> object:
    """merge_into a new tensor."""
    import torch

    out = torch.empty_like(base)
    merge_into(out, base, factors)
    return out


def _swap_in_place(inner, model, targets: dict[str, list[str]], base: dict[str, object],
                   lora: dict[str, tuple]) -> bool:
    """Builds every new layer weight first, then assigns them all: either every layer changes
    or none does. Returns False (nothing changed) when a layer is not one this path knows."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    plan = []
    for name, shards in targets.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            return False
        if not isinstance(layer, LinearBase) or not isinstance(
                layer.quant_method, UnquantizedLinearMethod):
            return False
        if any(s not in base for s in shards):
            return False
        expected = (sum(getattr(layer, "output_partition_sizes", [layer.output_size])),
                    layer.input_size_per_partition
                    if hasattr(layer, "input_size_per_partition") else layer.input_size)
        parts = [base[s] for s in shards]
        if (any(w.dim() != 2 or w.shape[1] != expected[1] for w in parts)
                or sum(w.shape[0] for w in parts) != expected[0]):
            return False
        if not on_cpu and tuple(layer.weight.shape) != expected:
            return False
        plan.append((name, layer, shards, expected))
    # Each layer's new weight is built in a buffer kept from the previous merge: fresh memory
    # faults a page in per 4 KiB, which costs as much as the merge itself (20 ms of 40 here).
    scratch: dict[str, object] = inner.__dict__.setdefault("_rlhf_merge_buffers", {})
    staged = []
    for name, layer, shards, shape in plan:
        buf = scratch.pop(name, None)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != layer.params_dtype:
            buf = torch.empty(shape, dtype=layer.params_dtype)
        row = 0
        for shard in shards:  # straight into the shard's rows of the fused weight
            rows = base[shard].shape[0]
            merge_into(buf[row: row + rows], base[shard], lora.get(shard))
            row += rows
        staged.append((name, layer, buf))
    for name, layer, buf in staged:
        if on_cpu:
            # vLLM packs CPU weights for oneDNN/AMX after loading and drops the plain tensor;
            # give the layer its new weight and let the same dispatch pack it again.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            layer.weight = torch.nn.Parameter(buf, requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            # The buffer is free again only once the layer holds a packed copy and dropped the
            # plain weight (oneDNN, sgl); the plain-linear fallback computes with it, and
            # zentorch's unpacked path keeps a view of it.
            if layer.weight.numel() == 0 and not current_platform.is_zen_cpu():
                scratch[name] = buf
        else:
            layer.weight.data.copy_(buf)  # host to device, no staging copy
            scratch[name] = buf
    return True


def reload_merged(worker, base_dir: str, adapter_dir: str | None,
                  in_place: bool = True) -> list[str]:
    """Worker-side: merge adapter_dir into the base weights of the served model (None = base).
    Returns the checkpoint weight names rewritten. in_place=False takes vLLM's generic path."""
    import torch
    from vllm.platforms import current_platform

    inner = getattr(worker, "worker", worker)
    runner = inner.model_runner
    model = runner.get_model()
    lora = lora_factors(Path(adapter_dir)) if adapter_dir else {}
    previous: set[str] = getattr(inner, "_rlhf_merged_modules", set())
    targets = _fused_targets(model, set(lora) | previous)
    # Fused layers are rewritten whole, so their untouched shards are needed too (base values).
    shards = {s for group in targets.values() for s in group}
    # On GPU hosts the merge runs on the CPU in float32 (their CPUs may lack bf16
    # instructions); it is rounded on the copy into the layer.
    dtype = runner.model_config.dtype if current_platform.is_cpu() else torch.float32
    base = _base_weights(inner, base_dir, shards, dtype)
    if set(lora) - set(base):
        raise ValueError(f"base model has no weights for {sorted(set(lora) - set(base))}")
    tp = getattr(inner, "parallel_config", None)
    if in_place and (tp is None or tp.tensor_parallel_size == 1) and _swap_in_place(
            inner, model, targets, base, lora):
        inner._rlhf_merged_modules = set(lora)
        return sorted(f"{m}.weight" for m in base)
    if in_place:
        log.warning("merged mode: these layers are rebuilt through vLLM's slower reload_weights")
    weights = {m: merged(w, lora.get(m)) for m, w in base.items()}
    # vLLM processes a fused layer only once all its shards arrive, so every weight of a
    # touched block goes in, untouched ones with their base values.
    blocks = {m.rsplit(".", 1)[0] for m in shards}
    untouched = _base_weights(inner, base_dir, _block_modules(base_dir, blocks) - set(weights))
    items = [(f"{m}.weight", w) for m, w in {**untouched, **weights}.items()]
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
