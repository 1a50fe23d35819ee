"""Checkpoints of a run: everything needed to continue exactly where it stopped.

`<out>/checkpoints/step-<k>/` holds the policy adapter (a plain peft folder, also what was pushed
for version k), the critic adapter and value head, the optimizer, the KL controller, RNG states,
the data position and the step's metrics line. A checkpoint is written to a temp folder and
renamed, then `latest` is replaced atomically: a `kill -9` at any point leaves the previous
checkpoint intact. A run resumes from its latest checkpoint: steps after it (with
checkpoint_every > 1) are done again, none is done twice in the metrics.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rlhf.files import atomic_dir, atomic_write


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest(out: Path) -> Path | None:
    pointer = checkpoints_dir(out) / "latest"
    if not pointer.exists():
        return None
    folder = checkpoints_dir(out) / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


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
    steps = sorted((step_of(p) for p in root.glob("step-*")), reverse=True)
    for old in steps[keep:]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def load(folder: Path, *, model, optimizer) -> dict:
    trainable = torch.load(folder / "trainable.pt")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            named[name].copy_(value)
    blob = torch.load(folder / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return json.loads((folder / "state.json").read_text())
