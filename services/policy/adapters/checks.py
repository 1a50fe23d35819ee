"""The checks a pushed adapter must pass, against this replica's limits and its base model: the
header before any byte is stored (name, sha256 format, size, base model id, peft config: LoRA,
rank, lora_alpha and the per-module patterns finite and bounded, target modules a list of names,
never a regular expression the engine would run), the received weights before the registry may
load them (every tensor a LoRA A/B pair that fits a base module, every value finite and within
max_abs_value). Each refusal says what is wrong."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.formats import ADAPTER_WEIGHTS_FILE
from rlhf.plumbing.errors import FailedPrecondition, InvalidArgument
from rlhf.v1 import policy_pb2
from services.policy.adapters.registry import check_name

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# Keys of alpha_pattern / rank_pattern: module paths, matched literally enough that no pattern
# can make the matcher backtrack without end.
PATTERN_KEY_RE = re.compile(r"^[A-Za-z0-9_.]{1,256}$")
LORA_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class BaseShapes:
    """2-D weight shapes of the base model, read from its safetensors headers (no load)."""

    shapes: dict[str, tuple[int, int]]  # module path -> (out_features, in_features)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseShapes:
        from safetensors import safe_open

        shapes: dict[str, tuple[int, int]] = {}
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(".weight"):
                        shape = f.get_slice(key).get_shape()
                        if len(shape) == 2:
                            shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
        if not shapes:
            raise FailedPrecondition(f"no safetensors weights found in {model_dir}")
        return cls(shapes)

    @property
    def leaf_names(self) -> set[str]:
        return {path.rsplit(".", 1)[-1] for path in self.shapes}


@dataclass(frozen=True)
class PushLimits:
    base_model_id: str
    max_rank: int
    max_bytes: int
    max_abs_value: float = 1000.0
    max_alpha: float = 4096.0
    base_model_fingerprint: str = ""  # "" = the served base has none to compare


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_alpha(where: str, value, limits: PushLimits) -> None:
    if not _number(value) or not math.isfinite(value) or not 0 < value <= limits.max_alpha:
        raise InvalidArgument(f"peft config {where} must be a finite number in "
                              f"(0, {limits.max_alpha:g}] (max_lora_alpha), not {value!r}")


def _check_patterns(peft: dict, limits: PushLimits) -> None:
    for field in ("alpha_pattern", "rank_pattern"):
        pattern = peft.get(field) or {}
        if not isinstance(pattern, dict):
            raise InvalidArgument(f"peft config {field!r} must be an object")
        for key, value in pattern.items():
            if not PATTERN_KEY_RE.match(key):
                raise InvalidArgument(f"peft config {field} key {key!r} must be a module path "
                                      "(letters, digits, '_' and '.'), not a pattern")
            if field == "alpha_pattern":
                _check_alpha(f"alpha_pattern[{key!r}]", value, limits)
            elif not isinstance(value, int) or isinstance(value, bool) or not (
                    1 <= value <= limits.max_rank):
                raise InvalidArgument(f"peft config rank_pattern[{key!r}] must be a rank in "
                                      f"[1, {limits.max_rank}], not {value!r}")


def check_header(header: policy_pb2.AdapterHeader, limits: PushLimits,
                 shapes: BaseShapes) -> dict:
    """Returns the parsed peft config; raises with the reason the push is refused."""
    check_name(header.adapter.name)
    if not SHA_RE.match(header.sha256):
        raise InvalidArgument("header.sha256 must be 64 lower-case hex characters")
    if header.size_bytes == 0:
        raise InvalidArgument("header.size_bytes must be > 0")
    if header.size_bytes > limits.max_bytes:
        raise InvalidArgument(
            f"adapter is {header.size_bytes} bytes; this replica accepts at most "
            f"{limits.max_bytes} (max_adapter_bytes)"
        )
    if header.base_model_id != limits.base_model_id:
        raise FailedPrecondition(
            f"adapter was trained on base model {header.base_model_id!r}; this replica serves "
            f"{limits.base_model_id!r}"
        )
    if (header.base_model_fingerprint and limits.base_model_fingerprint
            and header.base_model_fingerprint != limits.base_model_fingerprint):
        raise FailedPrecondition(
            f"adapter was trained on a base model named {header.base_model_id!r} whose config "
            f"and tokenizer differ from this replica's (base model fingerprint "
            f"{header.base_model_fingerprint} != {limits.base_model_fingerprint})"
        )
    try:
        peft = json.loads(header.peft_config_json, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError) as exc:
        raise InvalidArgument(f"header.peft_config_json is not JSON: {exc}") from None
    if not isinstance(peft, dict):
        raise InvalidArgument("header.peft_config_json must be a JSON object")
    if peft.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"only LoRA adapters are served, not {peft.get('peft_type')!r}")
    rank = peft.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidArgument("peft config 'r' must be a positive integer")
    if rank > limits.max_rank:
        raise InvalidArgument(f"LoRA rank {rank} exceeds this replica's max_lora_rank "
                              f"{limits.max_rank}")
    for unsupported in ("use_dora", "modules_to_save"):
        if peft.get(unsupported):
            raise InvalidArgument(f"peft option {unsupported!r} is not supported for serving")
    if "lora_alpha" in peft:
        _check_alpha("'lora_alpha'", peft["lora_alpha"], limits)
    _check_patterns(peft, limits)
    targets = peft.get("target_modules")
    leaves = shapes.leaf_names
    if isinstance(targets, str):
        # A regular expression: the engine would match it against every module, and a hostile
        # one can backtrack for hours on the event loop.
        raise InvalidArgument("peft config 'target_modules' must be a list of module names, "
                              f"not a regular expression ({targets[:64]!r})")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        missing = [t for t in targets if t not in leaves]
        if missing:
            raise InvalidArgument(
                f"target modules {missing} do not exist in the base model (it has "
                f"{sorted(leaves)})"
            )
    else:
        raise InvalidArgument("peft config 'target_modules' must be a list of module names")
    return peft


def check_weights(folder: Path, shapes: BaseShapes, max_rank: int,
                  max_abs_value: float | None = None) -> None:
    """Every LoRA tensor must fit a base module: A is (r, in), B is (out, r); with
    max_abs_value, every value must be finite and at most that in magnitude. Reads the whole
    file: run it off the event loop."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), framework="pt") as f:
            keys = list(f.keys())
            tensor_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidArgument(f"adapter weights are not a valid safetensors file: {exc}") from None
    if not keys:
        raise InvalidArgument("adapter weights file holds no tensors")
    for key, shape in tensor_shapes.items():
        m = LORA_KEY_RE.match(key)
        if m is None:
            raise InvalidArgument(f"adapter tensor {key!r} is not a LoRA A/B weight")
        module, which = m.group(1), m.group(2)
        base = shapes.shapes.get(module)
        if base is None:
            raise InvalidArgument(f"adapter tensor {key!r} names module {module!r}, which the "
                                  "base model does not have (wrong base model?)")
        out_features, in_features = base
        if len(shape) != 2:
            raise InvalidArgument(f"adapter tensor {key!r} has shape {shape}; expected 2-D")
        if which == "A" and shape[1] != in_features:
            raise InvalidArgument(f"adapter tensor {key!r} has shape {shape}; the base module "
                                  f"takes {in_features} inputs")
        if which == "A" and shape[0] > max_rank:
            raise InvalidArgument(f"adapter tensor {key!r} has rank {shape[0]}; this replica "
                                  f"accepts at most {max_rank}")
        if which == "B" and shape[0] != out_features:
            raise InvalidArgument(f"adapter tensor {key!r} has shape {shape}; the base module "
                                  f"has {out_features} outputs")
    for key, shape in tensor_shapes.items():
        if ".lora_A" in key:
            partner = key.replace(".lora_A", ".lora_B")
            if partner not in tensor_shapes or tensor_shapes[partner][1] != shape[0]:
                raise InvalidArgument(f"adapter tensor {key!r} has no matching lora_B of rank "
                                      f"{shape[0]}")
    if max_abs_value is not None:
        check_values(folder, max_abs_value)


def check_values(folder: Path, max_abs_value: float) -> None:
    """Every tensor finite and within +-max_abs_value (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if not torch.isfinite(tensor).all():
                raise InvalidArgument(f"adapter tensor {key!r} holds NaN or infinite values")
            if tensor.numel() and tensor.abs().max().item() > max_abs_value:
                raise InvalidArgument(
                    f"adapter tensor {key!r} holds values up to {tensor.abs().max().item():.3g}; "
                    f"this replica accepts at most {max_abs_value:g} (max_adapter_abs_value)"
                )
