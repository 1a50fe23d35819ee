"""Checkpoints of a run: everything needed to continue exactly where it stopped.

`<out>/checkpoints/step-<k>/` holds the policy adapter (a plain peft folder, also what was pushed
for version k), the critic adapter and value head, the optimizer, the KL controller, RNG states,
the data position and the step's metrics line. A checkpoint is written to a temp folder,
fsynced and renamed, then `latest` is replaced the same way (`rlhf.files`): a `kill -9` or a
power loss at any point leaves the previous checkpoint intact. A run resumes from its newest
checkpoint that reads back whole (`pick`): a corrupt one, or a `latest` naming anything but a
`step-<k>` folder of this run, is passed over with a warning. Steps after the checkpoint (with
checkpoint_every > 1) are done again, none is done twice in the metrics.

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only, so a
planted pickle cannot run code in the trainer.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from rlhf.files import atomic_dir, atomic_write

log = logging.getLogger("rlhf.trainer")

_STEP_NAME = re.compile(r"step-(\d+)")
_STATE_KEYS = ("step", "version", "cursor", "kl_ctl")
# What numpy's RNG state pickles to (a uint32 array): the one non-tensor object weights_only
# must accept in optimizer.pt.
_NUMPY_RNG = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


class CorruptCheckpoint(ValueError):
    """A checkpoint folder that does not read back whole; the message says what is wrong."""


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest(out: Path) -> Path | None:
    """The checkpoint `latest` names, if it names a `step-<k>` folder of this run that holds a
    state.json; None otherwise (a pointer leading elsewhere is never followed)."""
    pointer = checkpoints_dir(out) / "latest"
    try:
        name = pointer.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring the checkpoint pointer %s: %s", pointer, exc)
        return None
    folder = _step_folder(out, name)
    if folder is None:
        log.warning("ignoring the checkpoint pointer %s: %r is not a step-<k> folder of %s",
                    pointer, name[:100], checkpoints_dir(out))
        return None
    return folder if (folder / "state.json").exists() else None


def _step_folder(out: Path, name: str) -> Path | None:
    """`checkpoints/<name>` when name is `step-<k>` and the folder really lies there (not a
    symlink out of the run folder)."""
    if not _STEP_NAME.fullmatch(name):
        return None
    root = checkpoints_dir(out)
    folder = root / name
    if folder.is_symlink() or not folder.is_dir():
        return None
    if folder.resolve().parent != root.resolve():
        return None
    return folder


def _saved_steps(out: Path) -> list[int]:
    """Steps of the `step-<k>` entries of the checkpoints folder, newest first."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    return sorted((int(m[1]) for p in root.iterdir() if (m := _STEP_NAME.fullmatch(p.name))),
                  reverse=True)


def pick(out: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else the one before it, and so on
    (every step folder, newest first, when there is no usable pointer), the first that reads
    back whole. Each one passed over is logged as a warning."""
    pointed = latest(out)
    steps = _saved_steps(out)
    if pointed is not None:
        steps = [k for k in steps if k < step_of(pointed)]
    candidates = [pointed, *(_step_folder(out, f"step-{k}") for k in steps)]
    tried = 0
    for folder in candidates:
        if folder is None:
            continue
        tried += 1
        try:
            read(folder)
        except CorruptCheckpoint as exc:
            log.warning("checkpoint %s is unreadable (%s); trying the one before it", folder, exc)
            continue
        return folder
    if tried:
        log.warning("no checkpoint of %s reads back whole; the run starts over", out)
    return None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def step_of(folder: Path) -> int:
    """The step a checkpoint folder (`step-<k>`) holds."""
    return int(folder.name.split("-")[1])


def save(out: Path, step: int, *, model, optimizer, state: dict, keep: int) -> Path:
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    with atomic_dir(final) as tmp:
        model.save_policy_adapter(tmp / "policy")
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    atomic_write(root / "latest", final.name)
    for old in _saved_steps(out)[keep:]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def read(folder: Path) -> tuple[dict, dict, dict]:
    """(trainable tensors, optimizer blob, state) of a checkpoint, each checked for the keys and
    types a resume uses; CorruptCheckpoint says what is missing or damaged."""
    try:
        state = json.loads((folder / "state.json").read_text())
        trainable = torch.load(folder / "trainable.pt", map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(_NUMPY_RNG):
            blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        adapter_config = json.loads((folder / "policy" / "adapter_config.json").read_text())
        with safe_open(folder / "policy" / "adapter_model.safetensors", "pt") as adapter:
            adapter_tensors = len(list(adapter.keys()))
    except Exception as exc:  # noqa: BLE001 - any damaged file means the same: not this one
        raise CorruptCheckpoint(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise CorruptCheckpoint(f"state.json lacks one of {', '.join(_STATE_KEYS)}")
    if state["step"] != step_of(folder):
        raise CorruptCheckpoint(f"state.json holds step {state['step']!r}")
    if not isinstance(trainable, dict) or not trainable or not all(
            isinstance(v, torch.Tensor) and bool(torch.isfinite(v).all())
            for v in trainable.values()):
        raise CorruptCheckpoint("trainable.pt is not a mapping of finite tensors")
    if not isinstance(blob, dict) or not {"optimizer", "rng"} <= set(blob):
        raise CorruptCheckpoint("optimizer.pt lacks the optimizer or the RNG state")
    if not isinstance(adapter_config, dict) or adapter_tensors == 0:
        raise CorruptCheckpoint("the policy adapter folder is incomplete")
    return trainable, blob, state


def load(folder: Path, *, model, optimizer) -> dict:
    """Restores the model's trainable weights, the optimizer and the RNGs; returns the state.
    A checkpoint of another shape (another lora_rank, targets or algorithm) is a ValueError."""
    trainable, blob, state = read(folder)
    named = dict(model.named_parameters())
    if any(n not in named or named[n].shape != v.shape for n, v in trainable.items()):
        raise ValueError(f"checkpoint {folder} does not match this run's model (another "
                         "lora_rank, target_modules or algo?); use another out folder")
    with torch.no_grad():
        for name, value in trainable.items():
            named[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return state


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a line that does not parse as a row with a step (the
    torn last line of a crash mid-append) is dropped with a warning naming it."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
            if not isinstance(step, int) or isinstance(step, bool):
                raise TypeError("step is not an integer")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("dropping %s:%d, not a metrics row (%s): %.80r", path, number,
                        type(exc).__name__, line)
            continue
        rows.append(row)
    return rows
