"""Configuration of the policy service (env prefix RLHF_POLICY_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from rlhf.paths import DEFAULT_MODEL_NAME
from rlhf.plumbing.auth import token_from
from rlhf.plumbing.config import ServiceConfig
from rlhf.plumbing.cpus import CpuList

# vLLM accepts only these LoRA ranks as the engine maximum.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class PolicyConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="RLHF_POLICY_")
    service = "policy"

    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus port; 0 = free one.")
    model: Path | None = Field(
        None, description="HF model folder (default: the prepared SmolLM2 under data_dir)."
    )
    base_model_id: str | None = Field(
        None, description="Id pushed adapters must name (default: the model folder's name)."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weights dtype in vLLM."
    )
    max_model_len: int = Field(2048, ge=16, description="Context length (prompt + completion).")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size in GiB (CPU).")
    max_num_seqs: int = Field(64, ge=1, description="Sequences vLLM schedules at once.")
    max_num_batched_tokens: int = Field(
        8192, ge=16, description="Tokens per engine step (raised to max_model_len if lower)."
    )
    enforce_eager: bool = Field(True, description="Skip graph capture (no gain on CPU).")
    cpu_cores: CpuList = Field(
        "", description="CPU build of vLLM: run the service and its engine on these cores only, "
        "e.g. '0-3' (empty: all). Keeps a trainer on the same machine off the policy's cores.",
    )
    seed: int = Field(0, description="Engine seed (unseeded requests still differ).")
    adapter_mode: Literal["lora", "merged"] = Field(
        "lora", description="lora: every kept version servable; merged: active one merged in."
    )
    cpu_lora_ops: Literal["grouped", "vllm"] = Field(
        "grouped", description="CPU build, lora mode: grouped = one matmul per adapter in the "
        "batch (services/policy/vllm_backend/cpu_lora.py); vllm = vLLM's own per-token ops.",
    )
    max_lora_rank: int = Field(16, description="Largest LoRA rank accepted (a vLLM rank).")
    keep_versions: int = Field(4, ge=1, description="Adapter versions kept loaded per name.")
    max_loaded_adapters: int = Field(
        8, ge=1, description="Most adapter versions loaded at once, over all names."
    )
    max_adapter_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest adapter upload accepted."
    )
    max_n: int = Field(16, ge=1, description="Largest n per prompt.")
    max_prompts_per_request: int = Field(256, ge=1, description="Most prompts per Generate call.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request omits it.")
    max_pending_sequences: int = Field(
        1024, ge=1, description="Admission bound: sequences (prompts x n) in flight at once."
    )
    admin_token: str | None = Field(
        None, repr=False,
        description="Token the adapter admin calls need (push, activate, drop, keep).",
    )
    admin_token_file: Path | None = Field(
        None, description="File holding admin_token (when that is unset)."
    )
    insecure_no_auth: bool = Field(
        False, description="Start without an admin token: anyone who reaches the port can push "
        "and activate adapters. For throwaway tests only."
    )

    switch_timeout_seconds: float = Field(
        30.0, gt=0, description="merged mode: how long an adapter switch waits for requests "
        "pinned to the outgoing version; then they are aborted (ABORTED) and the switch goes on.",
    )
    max_adapter_abs_value: float = Field(
        1000.0, gt=0, description="Largest absolute value a pushed adapter tensor may hold.")
    max_lora_alpha: float = Field(
        4096.0, gt=0, description="Largest lora_alpha (and alpha_pattern value) accepted.")

    def default_receive_bytes(self) -> int:
        # The largest request is a full Generate: every prompt at the context length, at most
        # 16 bytes of text or ids per token; pushes arrive in chunks of at most 4 MiB.
        generate = self.max_prompts_per_request * self.max_model_len * 16
        return max(generate, 4 * 1024 * 1024 + 64 * 1024)

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {VLLM_LORA_RANKS}")
        return value

    def resolved_model(self) -> Path:
        return self.model or self.data_dir / "models" / DEFAULT_MODEL_NAME

    def resolved_base_model_id(self) -> str:
        return self.base_model_id or self.resolved_model().name

    def resolved_admin_token(self) -> str | None:
        return token_from(self.admin_token, self.admin_token_file, "the policy's admin token")

    def adapters_dir(self) -> Path:
        return self.data_dir / "policy" / "adapters"
