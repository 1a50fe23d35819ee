"""What one training run does: `RunSettings`, from a YAML file, CLI flags or a StartRun request.

One object for both ways of running the learner (`rlhf train ppo` and TrainerService), with the
defaults and their reasons in one place. Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.plumbing.config import AddressList, ConfigError, read_yaml_mapping
from rlhf.plumbing.cpus import CpuList


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    model: Path | None = Field(None, description="Base model folder (default: prepared SmolLM2).")
    init_adapter: Path | None = Field(None, description="SFT adapter to start from.")
    prompts: Path | None = Field(None, description="Prompts JSONL ({prompt} or {messages}).")
    policy_addr: AddressList = Field(default_factory=list)
    reward_addr: AddressList = Field(default_factory=list)
    out: Path | None = Field(None, description="Run folder: checkpoints, metrics.jsonl, adapters.")
    steps: int = Field(20, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    # GRPO/RLOO need a group (>= 2); PPO works with 1 but more samples per prompt are cheap in vLLM.
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(8, ge=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0)
    target_kl: float | None = Field(None, gt=0, description="Adaptive KL target; None = fixed.")
    kl_horizon: int = Field(10000, ge=1)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    whiten_advantages: bool = True
    max_grad_norm: float = Field(1.0, gt=0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                                 "o_proj"])
    max_staleness: int = Field(0, ge=0, description="0 = strictly on-policy.")
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    adapter_name: str = "policy"
    push_quorum: float = Field(1.0, gt=0, le=1,
                               description="Fraction of replicas that must confirm.")
    admin_token: str | None = None
    retry_max_seconds: float = Field(600.0, gt=0, description="Give up waiting on a service after.")
    rpc_timeout_seconds: float = Field(300.0, gt=0)
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the learner's matmuls. bfloat16 (autocast) is about "
        "twice as fast on CPUs with AMX; weights, optimizer state and losses stay float32.",
    )
    cpu_cores: CpuList = Field(
        "", description="Run the learner on these CPU cores only, e.g. '4-7' (empty: all). On a "
        "machine shared with a CPU policy, give each its own cores so generation and training "
        "really overlap.",
    )

    @model_validator(mode="after")
    def _groups(self) -> RunSettings:
        if self.algo in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"{self.algo} needs samples_per_prompt >= 2 (a group to compare)")
        return self

    @classmethod
    def load(cls, yaml_file: Path | None = None, **overrides) -> RunSettings:
        data = {}
        source = "flags"
        if yaml_file is not None:
            source = str(yaml_file)
            data = read_yaml_mapping(yaml_file, "run config")
        data.update({k: v for k, v in overrides.items() if v is not None and v != ()})
        try:
            return cls(**data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<root>'}: "
                + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                for e in exc.errors()
            )
            raise ConfigError(f"invalid run config ({source}): {problems}") from None

    def resolved_model(self) -> Path:
        from rlhf.paths import default_model_dir

        return self.model or default_model_dir()

    def require_runnable(self) -> None:
        missing = [name for name in ("prompts", "out") if getattr(self, name) is None]
        if not self.policy_addr:
            missing.append("policy_addr")
        if not self.reward_addr:
            missing.append("reward_addr")
        if missing:
            raise ConfigError(f"a run needs {', '.join(missing)}")
