"""merged adapter mode: fold a LoRA adapter into the served base weights in place.

Runs inside the vLLM worker (through `collective_rpc`), so only paths cross the boundary, never
tensors (DESIGN.md: raw tensors in collective_rpc kwargs kill the engine). Only the modules the
adapter touches are rewritten: W = W_base + scale * B @ A, scale = alpha / r (alpha / sqrt(r) with
rsLoRA). Modules changed by the previous merge and not by this one get their base weights back.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path


def lora_deltas(adapter_dir: Path) -> dict[str, object]:
    """Module path -> delta weight (out, in) as float32 tensors."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    rank, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value.float()
    deltas = {}
    for module, ab in pairs.items():
        r = ab["A"].shape[0]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[module] = scale * (ab["B"] @ ab["A"])
    del rank
    return deltas


def reload_merged(worker, base_dir: str, adapter_dir: str | None) -> list[str]:
    """Worker-side: merge adapter_dir into the base weights of the served model (None = base).
    Returns the weight names reloaded."""
    from safetensors import safe_open

    inner = getattr(worker, "worker", worker)
    runner = inner.model_runner
    deltas = lora_deltas(Path(adapter_dir)) if adapter_dir else {}
    previous: set[str] = getattr(inner, "_rlhf_merged_modules", set())
    touched = set(deltas) | previous
    # vLLM fuses sibling projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and processes
    # a fused layer only once all its shards arrive, so every weight of a touched block is
    # reloaded: untouched ones with their base values.
    blocks = {module.rsplit(".", 1)[0] for module in touched}
    weights = []
    for file in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                if module is None or module.rsplit(".", 1)[0] not in blocks:
                    continue
                base = f.get_tensor(key)
                delta = deltas.get(module)
                weights.append((key, base if delta is None
                                else (base.float() + delta).to(base.dtype)))
    found = {k[: -len(".weight")] for k, _ in weights}
    if touched - found:
        raise ValueError(f"base model has no weights for {sorted(touched - found)}")
    runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    inner._rlhf_merged_modules = set(deltas)
    return sorted(k for k, _ in weights)
