"""Configuration of the trainer service (env prefix RLHF_TRAINER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf.paths import default_model_dir
from rlhf.plumbing.auth import token_from
from rlhf.plumbing.config import AddressList, CommaList, ServiceConfig


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
    device: str = Field("auto", description="Where runs that name none compute: auto (CUDA when "
                        "available, else CPU), cpu, cuda or cuda:N.")
    runs_dir: Path | None = Field(None, description="Where runs live (default data_dir/runs).")
    allowed_roots: CommaList = Field(
        default_factory=list, description="Folders a StartRun's model, init_adapter and prompts "
        "paths must lie under (after symlinks); default: data_dir and the models folder.")
    max_prompts_bytes: int = Field(
        64 * 1024 * 1024, ge=1, le=2**40, description="Largest prompts file a run may read.")
    policy_admin_token: str | None = Field(
        None, repr=False, description="The policy's admin token, for adapter pushes.")
    policy_admin_token_file: Path | None = Field(
        None, description="File holding policy_admin_token (when that is unset).")
    admin_token: str | None = Field(
        None, repr=False, description="Token StartRun/StopRun (and reads) need.")
    admin_token_file: Path | None = Field(
        None, description="File holding admin_token (when that is unset).")
    read_token: str | None = Field(
        None, repr=False, description="Token GetRun/WatchRun accept besides the admin token.")
    read_token_file: Path | None = Field(
        None, description="File holding read_token (when that is unset).")
    insecure_no_auth: bool = Field(
        False, description="Start without an admin token: anyone who reaches the port can start "
        "and stop runs. For throwaway tests only.")

    def resolved_runs_dir(self) -> Path:
        return self.runs_dir or self.data_dir / "runs"

    def resolved_allowed_roots(self) -> list[Path]:
        """The folders request paths must resolve under: the configured ones, else data_dir and
        the models folder (where `rlhf model prepare` puts models); the configured model folder
        always."""
        roots = list(self.allowed_roots) or [self.data_dir, default_model_dir().parent]
        if self.model is not None:
            roots.append(self.model)
        return [Path(r).expanduser().resolve() for r in roots]

    def resolved_admin_token(self) -> str | None:
        return token_from(self.admin_token, self.admin_token_file, "the trainer's admin token")

    def resolved_read_token(self) -> str | None:
        return token_from(self.read_token, self.read_token_file, "the trainer's read token")

    def resolved_policy_admin_token(self) -> str | None:
        return token_from(self.policy_admin_token, self.policy_admin_token_file,
                          "the policy's admin token")
