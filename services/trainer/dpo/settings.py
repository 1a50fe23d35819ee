"""What one DPO run does: `DPOSettings` (`rlhf train dpo` flags, or from Python)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rlhf.paths import default_model_dir
from rlhf.plumbing.config import AddressList, ClientTLS
from services.trainer.settings import LORA_TARGET_MODULES as DEFAULT_TARGET_MODULES
from services.trainer.settings import StageSettings
from services.trainer.tracking import REPORT_TO_HELP, ReportTo


class DPOSettings(StageSettings):
    what = "dpo settings"

    data: Path = Field(description="Preference JSONL ({prompt|instruction, chosen, rejected} per "
                       "line; the gateway's preference export as is).")
    out: Path = Field(description="Adapter folder to write (replaced as a whole when the run "
                      "ends; metrics.jsonl goes in it).")
    model: Path = Field(default_factory=default_model_dir,
                        description="Base model folder (HF format) [default: "
                        "$RLHF_HOME/models/SmolLM2-135M-Instruct].")
    init_adapter: Path | None = Field(
        None, description="Adapter to start from (an `rlhf train sft` folder); it is also the "
        "reference. Its rank and modules are kept (--lora-r/--lora-alpha/--target-modules do "
        "not apply).")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. "
        "2023).")
    # 0.1: the DPO paper's and TRL's default.
    beta: float = Field(0.1, gt=0, le=100, description="Strength of the pull to the reference "
                        "(DPO beta; IPO tau).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Share of pairs assumed "
                                   "mislabelled (conservative DPO; sigmoid loss only).")
    val_file: Path | None = Field(None, description="Held-out pairs JSONL (else --val-fraction "
                                  "of --data is held out).")
    val_fraction: float = Field(0.1, ge=0.0, le=0.9, description="Share of --data held out for "
                                "evaluation when there is no --val-file (0: none).")
    eval_every: int = Field(0, ge=0, description="Evaluate on the held-out pairs every N steps "
                            "(0: at the end of each epoch only); also before the first step.")
    epochs: int = Field(1, ge=1, description="Passes over the training pairs.")
    # LoRA DPO runs use rates well above full fine-tuning's 5e-7..1e-6 (Zephyr's LoRA recipe:
    # 5e-6..5e-5); 5e-5 moves a small model in one epoch of a few thousand pairs.
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate (constant).")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    max_length: int = Field(512, ge=2, description="Tokens of prompt + answer; longer answers "
                            "are cut at the end (a pair with nothing left of an answer is "
                            "dropped).")
    lora_r: int = Field(16, ge=1, description="LoRA rank (the policy serves up to its "
                        "max_lora_rank, 16 by default).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    # Stored in the adapter config; PPO, starting from this adapter, wants exact logprobs: 0.
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        DEFAULT_TARGET_MODULES, min_length=1,
        description="Modules to adapt (the attention projections, as vLLM serves them); repeat "
        "the flag or give a comma list.")
    seed: int = Field(0, description="Seeds the split, the LoRA init and the batch order.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    report_to: ReportTo = Field("none", description=REPORT_TO_HELP)
    device: str = Field(
        "auto", description="auto (cuda when available, else cpu) or a torch device.")
    progress: bool = Field(True, description="Show a progress bar (stderr) with the loss.")
    push_to: AddressList = Field(
        default_factory=list, description="Policy replica host:port to push the adapter to when "
        "the run ends (repeatable).")
    adapter_name: str = Field("dpo", description="Name the adapter is pushed under.")
    base_model_id: str | None = Field(
        None, description="Base model id the push names; the policy refuses any other "
        "(default: the model folder's name, as the policy's own default).")
    admin_token: str | None = Field(None, repr=False,
                                    description="Policy admin token (for the push).")
    admin_token_file: Path | None = Field(
        None, description="File holding the policy admin token (when --admin-token is unset).")
    client_tls: ClientTLS = Field(
        default_factory=ClientTLS, description="TLS for the push to the policy.")
    push_timeout_seconds: float = Field(
        120.0, gt=0, le=86400, description="Give up on an unreachable policy after.")

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DPOSettings:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only, not ipo")
        return self

    def resolved_base_model_id(self) -> str:
        """The id a push carries: the policy accepts only its own base model's."""
        return self.base_model_id or Path(self.model).name
