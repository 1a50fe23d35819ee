"""Configuration of the reward service (env prefix RLHF_REWARD_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf.plumbing.config import CommaList, ServiceConfig


class RewardConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="RLHF_REWARD_")
    service = "reward"

    grpc_port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus port; 0 = free one.")
    scorer: CommaList = Field(
        default_factory=list, description="Scorer spec [WEIGHT*]KIND:ARG, repeatable."
    )
    max_batch_items: int = Field(1024, ge=1, description="Most items per Score call.")
    max_text_chars: int = Field(32768, ge=1, description="Longest prompt or completion.")
