"""Configuration of the policy service (env prefix RLHF_POLICY_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf.plumbing.config import ServiceConfig


class PolicyConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="RLHF_POLICY_")
    service = "policy"

    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus port; 0 = free one.")
    model: Path | None = Field(None, description="HF model folder (default: the prepared SmolLM2).")
    adapter_mode: Literal["lora", "merged"] = Field(
        "lora", description="lora: every kept version servable; merged: active one merged in."
    )
    max_n: int = Field(16, ge=1, description="Largest n per prompt.")
    max_prompts_per_request: int = Field(256, ge=1, description="Most prompts per Generate call.")
    admin_token: str | None = Field(None, description="Token PushAdapter/SetActiveAdapter need.")
