"""What the reward-model loop does: `LoopSettings` (`rlhf loop rm` flags, a YAML file, or from
Python). Secrets (the gateway's admin key, the reward service's admin token) come from the
environment or files, never from flags a process listing shows."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from rlhf.plumbing.config import AddressList, ClientTLS
from services.trainer.settings import StageSettings


class LoopSettings(StageSettings):
    what = "loop settings"

    gateway_url: str = Field(description="Base URL of the gateway whose feedback is exported, "
                             "e.g. http://gateway:8000.")
    admin_key: str | None = Field(None, repr=False, description="An admin API key of the "
                                  "gateway (its admin_api_keys), for GET /v1/feedback/export.")
    reward_addr: AddressList = Field(description="Reward service host:port (repeatable) or "
                                     "dns:///name:port; every replica gets each version.")
    reward_token: str | None = Field(None, repr=False, description="The reward service's admin "
                                     "token (PushRewardModel, SetActiveRewardModel).")
    client_tls: ClientTLS = Field(default_factory=ClientTLS,
                                  description="TLS for the calls to the reward service.")
    folder: Path = Field(description="The loop's own folder: state (cursor), held-out pairs, "
                         "the versions it pushed, rounds.jsonl.")
    init_model: Path | None = Field(
        None, description="Reward model folder to warm-start from while the active version is "
        "not one this loop pushed (e.g. the model the reward service started with).")
    seed_heldout: Path | None = Field(
        None, description="Preference JSONL counted as old held-out pairs from the first round "
        "(e.g. the first reward model's validation file).")
    every_new_pairs: int = Field(200, ge=1, le=10_000_000, description="Train once this many "
                                 "new preference pairs have arrived since the last version.")
    poll_seconds: float = Field(300.0, gt=0, le=86400, description="Service mode: seconds "
                                "between looks at the gateway.")
    max_pairs_per_round: int = Field(50_000, ge=1, le=10_000_000, description="Most new pairs "
                                     "one round pulls; the rest wait for the next round.")
    page_size: int = Field(1000, ge=1, le=100_000, description="Rows per export request.")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the new answers "
                                    "(all pairs of an answer together) held out for evaluation.")
    max_heldout_pairs: int = Field(5000, ge=1, le=10_000_000, description="Old held-out pairs "
                                   "kept (the newest).")
    max_accuracy_drop: float = Field(0.05, ge=0, le=1, description="Refuse a version whose "
                                     "accuracy on old held-out pairs is lower than the active "
                                     "version's by more than this.")
    min_new_accuracy: float = Field(0.6, ge=0, le=1, description="Refuse a version whose "
                                    "accuracy on the new held-out pairs is below this.")
    version_prefix: str = Field("loop-", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}$",
                                description="Versions are named PREFIX + a counter.")
    keep_versions: int = Field(3, ge=1, le=1000, description="Pushed version folders kept in "
                               "the loop's folder (the active one always).")
    http_timeout_seconds: float = Field(120.0, gt=0, le=3600, description="Deadline of one "
                                        "export request.")
    rpc_timeout_seconds: float = Field(600.0, gt=0, le=86400, description="Deadline of one "
                                       "push or activation.")
    retry_max_seconds: float = Field(60.0, ge=0, le=86400, description="How long an "
                                     "unreachable reward service is waited for.")
    # Reward-model training of each round (`rlhf train rm` settings).
    backbone: Literal["lora", "frozen", "full"] = Field(
        "lora", description="What trains besides the head (as `rlhf train rm --backbone`).")
    merge: bool = Field(True, description="Push LoRA merged into a full model (a version then "
                        "needs no other folder).")
    epochs: int = Field(1, ge=1, le=1000, description="Passes over each round's new pairs.")
    batch_size: int = Field(16, ge=1, le=65536, description="Pairs per step.")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate.")
    max_length: int = Field(256, ge=8, le=1_000_000, description="Tokens per (prompt, response).")
    seed: int = Field(0, ge=0, description="Seeds each round's training.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int = Field(0, ge=0, description="Torch CPU threads (0: torch's default).")

    @field_validator("gateway_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")
