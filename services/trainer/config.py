"""Configuration of the trainer service (env prefix RLHF_TRAINER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf.plumbing.config import AddressList, ServiceConfig


class TrainerConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="RLHF_TRAINER_")
    service = "trainer"

    grpc_port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus port; 0 = free one.")
    policy_addr: AddressList = Field(
        default_factory=list, description="Policy replicas: host:port (repeatable) or dns:///name."
    )
    reward_addr: AddressList = Field(
        default_factory=list, description="Reward replicas: host:port (repeatable) or dns:///name."
    )
    model: Path | None = Field(None, description="Base model folder for runs that name none.")
    prompts: Path | None = Field(None, description="Prompts JSONL for runs that name none.")
    runs_dir: Path | None = Field(None, description="Where runs live (default data_dir/runs).")
    policy_admin_token: str | None = Field(None, description="Admin token for adapter pushes.")

    def resolved_runs_dir(self) -> Path:
        return self.runs_dir or self.data_dir / "runs"
