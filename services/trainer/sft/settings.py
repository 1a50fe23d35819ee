"""What one SFT run does: `SFTSettings` (`rlhf train sft` flags, or from Python)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from rlhf.paths import default_model_dir
from services.trainer.settings import LORA_TARGET_MODULES as DEFAULT_TARGET_MODULES
from services.trainer.settings import StageSettings
from services.trainer.tracking import REPORT_TO_HELP, ReportTo


class SFTSettings(StageSettings):
    what = "sft settings"

    data: Path = Field(description='SFT JSONL: {"prompt","response"}, {"text"} or {"messages"} '
                       "per line.")
    out: Path = Field(description="Adapter folder to write (replaced as a whole when the run "
                      "ends).")
    model: Path = Field(default_factory=default_model_dir,
                        description="Base model folder (HF format) [default: "
                        "$RLHF_HOME/models/SmolLM2-135M-Instruct].")
    epochs: int = Field(3, ge=1, description="Passes over the data.")
    # 2e-4 is the common LoRA SFT rate (QLoRA's, for 7B-13B).
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (constant).")
    batch_size: int = Field(8, ge=1, description="Rows per optimizer step (packed blocks, or "
                            "examples with --no-packing).")
    max_length: int = Field(512, ge=2, description="Packed block length (or cut length with "
                            "--no-packing).")
    # The policy service accepts ranks up to its max_lora_rank (16 by default).
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    # Stored in the adapter config and used again by PPO, where dropout would make recomputed
    # logprobs noisy (the PPO ratio must be 1 on the first pass): so 0.
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        DEFAULT_TARGET_MODULES, min_length=1,
        description="Modules to adapt (the attention projections, as vLLM serves them); repeat "
        "the flag or give a comma list.")
    seed: int = Field(0, description="Seeds the LoRA init and the order of the batches.")
    packing: bool = Field(True, description="Pack examples (each ends with EOS) into max_length "
                          "blocks, no padding wasted; off (--no-packing): one padded row per "
                          "example.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    report_to: ReportTo = Field("none", description=REPORT_TO_HELP)
    device: str = Field(
        "auto", description="auto (cuda when available, else cpu) or a torch device.")
    progress: bool = Field(True, description="Show a progress bar (stderr) with the loss.")
