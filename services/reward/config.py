"""Configuration of the reward service (env prefix RLHF_REWARD_)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from rlhf.plumbing.auth import token_from
from rlhf.plumbing.config import CommaList, ServiceConfig


class RewardConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="RLHF_REWARD_")
    service = "reward"

    grpc_port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus port; 0 = free one.")
    scorer: CommaList = Field(
        default_factory=list,
        description="Scorer spec [WEIGHT*]KIND:ARG (rm:PATH, rm:@active for the pushed "
        "reward-model versions, rule:NAME?k=v, python:MODULE:FN); repeatable.",
    )
    max_batch_items: int = Field(1024, ge=1, le=2**32 - 1, description="Most items per Score call.")
    max_text_chars: int = Field(
        32768, ge=1, le=2**32 - 1, description="Longest prompt, completion or reference."
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most items per reward-model forward pass (1 = no batching)."
    )
    max_wait_ms: float = Field(
        5.0, ge=0, description="How long a queued item waits for others to fill its batch."
    )
    normalize: Literal["none", "rm", "all"] = Field(
        "none", description="Running mean/std normalisation: of no scorer, rm scorers, or all."
    )
    normalize_freeze_after: int = Field(
        0, ge=0, description="Freeze the normalisation statistics after this many items (0: never)."
    )
    device: str = Field("auto", description="Torch device of reward models: auto, cpu, cuda[:N].")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype of reward models."
    )
    rm_max_tokens: int = Field(
        512, ge=8, description="Longest tokenized (prompt, completion) a reward model sees."
    )
    rm_batch_tokens: int = Field(
        0, ge=0, description="Padded tokens per forward pass; a batch is split into similar-length "
        "passes within it (0: 2048 on CPU, 16384 on GPU).",
    )
    threads: int = Field(0, ge=0, description="Torch CPU threads (0: torch's default).")
    rm_store: Path | None = Field(
        None, description="Folder of the pushed reward-model versions that rm:@active serves "
        "(default: <data_dir>/reward/models).")
    rm_initial: Path | None = Field(
        None, description="Reward-model folder rm:@active starts with when no version is stored "
        "yet; it is kept as version rm_initial_version.")
    rm_initial_version: str = Field(
        "initial", description="Version name of rm_initial once stored.")
    rm_keep_versions: int = Field(
        5, ge=1, description="Pushed versions kept on disk (the active one always is).")
    max_rm_push_bytes: int = Field(
        16 * 1024**3, ge=1024, description="Largest reward-model folder a push may send.")
    rm_allowed_bases: CommaList = Field(
        default_factory=list, description="Base-model folders a pushed LoRA reward model may "
        "name (none: only full models are accepted).")
    admin_token: str | None = Field(
        None, repr=False, description="Token PushRewardModel and SetActiveRewardModel require.")
    admin_token_file: Path | None = Field(
        None, description="File holding admin_token (when that is unset).")
    insecure_no_auth: bool = Field(
        False, description="Serve rm:@active without an admin token: anyone who reaches the port "
        "can push and activate reward models.")

    def default_receive_bytes(self) -> int:
        # A Score call of a full training batch (prompts, completions, references) with room;
        # the texts' own bound is max_text_chars.
        return 32 * 1024 * 1024

    def rm_store_dir(self) -> Path:
        return self.rm_store or self.data_dir / "reward" / "models"

    def resolved_admin_token(self) -> str | None:
        return token_from(self.admin_token, self.admin_token_file, "the reward's admin token")

    @field_validator("rm_initial_version")
    @classmethod
    def _version_name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$", value):
            raise ValueError("must be 1-64 characters of [A-Za-z0-9._-], not starting with '.'")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or value.startswith("cuda:"):
            return value
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
