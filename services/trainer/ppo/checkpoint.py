"""Checkpoints of a run: everything needed to continue exactly where it stopped.

`<out>/checkpoints/step-<k>/` holds the policy adapter (a plain peft folder, also what was pushed
for version k), the critic adapter and value head, the optimizer, the KL controller, RNG states,
the data position and the step's metrics line. A checkpoint is written to a temp folder,
fsynced and renamed, then `latest` is replaced the same way (`rlhf.files`): a `kill -9` or a
power loss at any point leaves the previous checkpoint intact. A run resumes from its newest
checkpoint that reads back whole (`pick`): a corrupt one, or a `latest` naming anything but a
`step-<k>` folder of this run, is passed over with a warning. Steps after the checkpoint (with
checkpoint_every > 1) are done again, none is done twice in the metrics.

Two more pointers name checkpoints that pruning never removes, whatever `keep_checkpoints` says:
`last_good` (the newest checkpoint whose version passed its gates and was promoted:
`mark_last_good`) and `best` (the best by eval reward: `mark_best`, a JSON {"name", "score"}).
`resume_from` picks the checkpoint a run starts from (`resume_folder`): last, last_good, best or
a folder's path; resuming from an older checkpoint than the newest moves the newer ones aside to
`checkpoints/abandoned/<time>-<random>/` (they are the branch being abandoned, kept for inspection).

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only, so a
planted pickle cannot run code in the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from rlhf.files import atomic_dir, atomic_write, fsync_dir
from rlhf.plumbing.config import ConfigError

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


def last_good(out: Path) -> Path | None:
    """The checkpoint `last_good` names, if it is a `step-<k>` folder of this run."""
    return _pointed(out, "last_good", _read_pointer(checkpoints_dir(out) / "last_good"))


def best(out: Path) -> tuple[Path | None, float | None]:
    """(the checkpoint `best` names, its eval score), or (None, None)."""
    raw = _read_pointer(checkpoints_dir(out) / "best")
    if raw is None:
        return None, None
    try:
        entry = json.loads(raw)
        name, score = entry["name"], float(entry["score"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the checkpoint pointer best: %s", exc)
        return None, None
    folder = _pointed(out, "best", name) if isinstance(name, str) else None
    return (folder, score) if folder is not None else (None, None)


def _read_pointer(pointer: Path) -> str | None:
    try:
        return pointer.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring the checkpoint pointer %s: %s", pointer, exc)
        return None


def _pointed(out: Path, pointer: str, name: str | None) -> Path | None:
    if name is None:
        return None
    folder = _step_folder(out, name)
    if folder is None or not (folder / "state.json").exists():
        log.warning("ignoring the checkpoint pointer %s: %r is not a checkpoint of %s",
                    pointer, name[:100], checkpoints_dir(out))
        return None
    return folder


def mark_last_good(out: Path, folder: Path) -> bool:
    """Names `folder`, a checkpoint whose version was promoted, as last_good; False (nothing
    named) when it is not one of this run's checkpoints (a run resumed from another's)."""
    own = _step_folder(out, folder.name)
    if own is None or own.resolve() != folder.resolve():
        return False
    atomic_write(checkpoints_dir(out) / "last_good", folder.name)
    return True


def mark_best(out: Path, step: int, score: float) -> bool:
    """Names checkpoint step-<step> as best when its eval `score` beats the current best's (or
    there is none). False when it does not, or when the step has no checkpoint (a step between
    checkpoints: call this after the step's checkpoint is saved)."""
    folder = _step_folder(out, f"step-{step}")
    if folder is None or not math.isfinite(score):
        return False
    current, current_score = best(out)
    if current is not None and current != folder and current_score >= score:
        return False
    atomic_write(checkpoints_dir(out) / "best",
                 json.dumps({"name": folder.name, "score": score}))
    return True


def resume_folder(out: Path, point: str | Path) -> Path | None:
    """The checkpoint a run resumes from: `last` = `pick` (None: a fresh start); `last_good`,
    `best` or a folder's path must name a checkpoint that reads back whole, else ConfigError
    says why."""
    if point == "last":
        return pick(out)
    if point == "last_good":
        folder = last_good(out)
        if folder is None:
            raise ConfigError(f"resume_from last_good: {out} has no last_good checkpoint (no "
                              "checkpointed version of this run has been promoted yet)")
    elif point == "best":
        folder = best(out)[0]
        if folder is None:
            raise ConfigError(f"resume_from best: {out} has no best checkpoint (no checkpointed "
                              "version of this run has been evaluated yet)")
    else:
        folder = Path(point).expanduser()
        if not folder.is_dir() or not _STEP_NAME.fullmatch(folder.resolve().name):
            raise ConfigError(f"resume_from {str(point)!r} is not a checkpoint folder "
                              "(checkpoints/step-<k>)")
        folder = folder.resolve()
    try:
        read(folder)
    except CorruptCheckpoint as exc:
        raise ConfigError(f"resume_from {point}: checkpoint {folder} does not read back "
                          f"whole ({exc})") from None
    return folder


def abandon_after(out: Path, folder: Path) -> list[Path]:
    """Moves this run's checkpoints newer than `folder`'s step to `checkpoints/abandoned/<time>-*/`
    (a run resumed from an older checkpoint must not prune its new ones in their favour, nor
    overwrite them); `latest` then names `folder` if it is one of this run's. Returns where they
    went; pointers that named them are dropped."""
    root = checkpoints_dir(out)
    newer = [k for k in _saved_steps(out) if k > step_of(folder)]
    moved = []
    if newer:
        (root / "abandoned").mkdir(exist_ok=True)
        aside = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"),
                                      dir=root / "abandoned"))
        names = {f"step-{k}" for k in newer}
        for pointer in ("last_good", "best"):
            target = _read_pointer(root / pointer)
            name = target if pointer == "last_good" else _best_name(target)
            if name in names:
                (root / pointer).unlink(missing_ok=True)
        for k in newer:
            os.rename(root / f"step-{k}", aside / f"step-{k}")
            moved.append(aside / f"step-{k}")
        fsync_dir(aside)
        fsync_dir(root)
        log.warning("resuming from %s: the newer checkpoints %s were moved to %s", folder,
                    ", ".join(p.name for p in moved), aside)
    own = _step_folder(out, folder.name)
    if own is not None and own.resolve() == folder.resolve():
        atomic_write(root / "latest", folder.name)
    return moved


def _best_name(raw: str | None) -> str | None:
    try:
        return json.loads(raw)["name"] if raw else None
    except (ValueError, KeyError, TypeError):
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
    prune(out, keep)
    return final


def prune(out: Path, keep: int) -> None:
    """Removes the checkpoints past the newest `keep`, except last_good's and best's."""
    kept = {step_of(f) for f in (last_good(out), best(out)[0]) if f is not None}
    for old in _saved_steps(out)[keep:]:
        if old not in kept:
            shutil.rmtree(checkpoints_dir(out) / f"step-{old}", ignore_errors=True)


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
    # The run's settings choose the learning rate, also of a resumed run (the saved optimizer
    # carries the one it was saved with).
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(blob["optimizer"])
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
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
