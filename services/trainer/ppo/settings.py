"""What one RL run does: `PPOSettings`, from a YAML file, CLI flags or a StartRun request.

One object for both ways of running the learner (`rlhf train ppo` and TrainerService), with the
defaults and their reasons in one place. Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from rlhf.plumbing.config import AddressList, ClientTLS, ConfigError
from rlhf.plumbing.cpus import CpuList
from services.trainer.settings import StageSettings
from services.trainer.tracking import REPORT_TO_HELP, ReportTo

# The attention projections, as vLLM serves LoRA on them.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The checkpoints `resume_from` names (services/trainer/ppo/checkpoint.py); anything else is a path.
RESUME_POINTS = ("last", "last_good", "best")


class PPOSettings(StageSettings):
    # Every number has finite bounds: a run's settings come from StartRun requests too.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    what = "run config"

    algo: Literal["ppo", "grpo", "rloo"] = Field(
        "ppo", description="ppo (critic + GAE), grpo (group-relative) or rloo (leave-one-out).")
    model: Path | None = Field(None, description="Base model folder (default: prepared SmolLM2).")
    base_model_id: str | None = Field(
        None, description="Base model id pushed adapters name; the policy refuses any other "
        "(default: the model folder's name, as the policy's own default).")
    init_adapter: Path | None = Field(None, description="SFT adapter to start from.")
    prompts: Path | None = Field(None, description="Prompts JSONL ({prompt} or {messages}).")
    policy_addr: AddressList = Field(
        default_factory=list, description="Policy replica host:port (repeatable) or a dns:/// "
        "name.")
    reward_addr: AddressList = Field(
        default_factory=list, description="Reward host:port (repeatable) or dns:///.")
    client_tls: ClientTLS = Field(
        default_factory=ClientTLS, description="TLS for the calls to the policy and reward.")
    out: Path | None = Field(None, description="Run folder: checkpoints, metrics.jsonl, adapters "
                             "(resumes if it holds a checkpoint).")
    steps: int = Field(20, ge=1, le=1_000_000, description="Optimisation steps of the run.")
    prompts_per_step: int = Field(8, ge=1, le=4096,
                                  description="Prompts per step (the global batch).")
    # GRPO/RLOO need a group (>= 2); PPO works with 1 but more samples per prompt are cheap in vLLM.
    samples_per_prompt: int = Field(4, ge=1, le=256, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(32, ge=1, le=32768, description="Tokens generated per completion.")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature of rollouts.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate.")
    ppo_epochs: int = Field(2, ge=1, le=100, description="Passes over each step's rollouts.")
    minibatch_size: int = Field(8, ge=1, le=65536, description="Sequences per optimizer step.")
    clip_range: float = Field(0.2, gt=0, le=10, description="PPO ratio clip range epsilon.")
    clip_range_low: float | None = Field(
        None, gt=0, le=10, description="Lower clip of the ratio, 1 - clip_range_low (default: "
        "clip_range).")
    clip_range_high: float | None = Field(
        None, gt=0, le=10, description="Upper clip of the ratio, 1 + clip_range_high (default: "
        "clip_range; DAPO's Clip-Higher uses 0.28 with 0.2 below).")
    clip_range_value: float = Field(0.2, gt=0, le=1e4, description="Value-update clip range.")
    vf_coef: float = Field(0.5, ge=0, le=100, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0, le=100, description="KL penalty coefficient beta (0: none).")
    target_kl: float | None = Field(None, gt=0, le=100,
                                    description="Adaptive KL target; None = fixed.")
    kl_horizon: int = Field(10000, ge=1, le=10**9, description="Time scale of the adaptive KL "
                            "controller, in samples.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimator of the penalty (Schulman 2020), in PPO's "
        "rewards and in GRPO/RLOO's loss term.")
    # dapo (token-mean, symmetric clip by default) is PPO's own loss, so all algos share one
    # default; the table of docs/trainer.md (bench/recipes.py) says which suits grpo best.
    loss_type: Literal["grpo", "dapo", "dr_grpo", "gspo", "cispo"] = Field(
        "dapo", description="Policy loss (services/trainer/losses.py): grpo (sequence-mean), "
        "dapo (token-mean), dr_grpo (no std, constant normaliser), gspo (sequence ratio), "
        "cispo (clipped, detached IS weight). ppo takes dapo only: PPO's own clipped surrogate.")
    mismatch_correction: Literal["none", "tis", "mis_token", "mis_seq"] = Field(
        "tis", description="Correction of the vLLM/learner logprob mismatch: tis (truncated IS "
        "weight min(r, C) per token), mis_token / mis_seq (drop tokens / sequences whose ratio "
        "leaves [1/C, C]) or none; r = pi_learner_old / pi_vllm.")
    mismatch_threshold: float = Field(
        2.0, gt=1, le=1e4, description="C of mismatch_correction: the TIS cap, the MIS band.")
    whiten_advantages: bool = Field(True, description="Normalise PPO advantages over the batch.")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm.")
    # 512: the largest LoRA rank vLLM serves.
    lora_rank: int = Field(8, ge=1, le=512, description="LoRA rank of the policy (and critic).")
    lora_alpha: float = Field(16.0, gt=0, le=4096,
                              description="LoRA alpha (scale = alpha / rank).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Module names LoRA adapts.")
    max_staleness: int = Field(0, ge=0, le=1000, description="Adapter versions a rollout may lag "
                               "the trained one; 0 = strictly on-policy.")
    # Rollout seeds are derived as seed * 100_003 + ...; a 32-bit seed keeps them in the uint64
    # the policy's SamplingParams.seed takes.
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seed of sampling, data order and initialisation.")
    checkpoint_every: int = Field(1, ge=1, le=1_000_000, description="Save a checkpoint every N "
                                  "steps (and always after the last step, or when stopped).")
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="Newest checkpoints kept on disk; the last_good and best "
        "checkpoints are kept besides.")
    resume_from: str = Field(
        "last", min_length=1, max_length=4096, description="Checkpoint a run in an existing out "
        "folder resumes from: last (the newest that reads back whole), last_good (the newest "
        "promoted version's), best (the best by eval reward) or the path of a step-<k> folder.")
    # Gates (services/trainer/ppo/gates.py): a step that fails them is rolled back, never pushed.
    max_update_norm: float = Field(
        2.0, gt=0, le=1e6, description="Largest relative L2 change of the policy's LoRA weights "
        "over one step, ||after - before|| / ||before||; a larger step fails its gate "
        "(docs/trainer.md, \"Gates and last good\").")
    on_bad_step: Literal["skip", "stop"] = Field(
        "stop", description="A step that fails its gates is rolled back and its batch dropped; "
        "stop: the run fails after max_bad_steps such steps in a row; skip: it goes on.")
    max_bad_steps: int = Field(
        3, ge=1, le=1_000_000, description="on_bad_step stop: failed steps in a row that end the "
        "run (1: the first).")
    adapter_name: str = Field("policy", description="Adapter name pushed to the policy.")
    push_quorum: float = Field(1.0, gt=0, le=1,
                               description="Fraction of replicas that must confirm.")
    # Staged commit and delivery check (services/trainer/ppo/delivery.py).
    stage_seconds: int = Field(
        600, ge=1, le=86400, description="A pushed version is staged on every replica (loaded, "
        "not active) and activated on all of them, or none when fewer than push_quorum staged "
        "it; a replica drops a staged version not activated (or kept) within this many seconds "
        "(promotion canary adds canary_wait_seconds).")
    delivery_threshold: float | None = Field(
        0.1, gt=0, le=100, description="Delivery check: largest per-token mean |logprob "
        "difference| (nats) between the policy's answer and the learner's own logprobs on the "
        "first rollouts of each new version; above it the version is 'not delivered as "
        "trained', its rollouts are refused and the run fails. 0.1 passes a correct bfloat16 "
        "policy (services/trainer/ppo/delivery.py). None: only the served sha256 is compared with "
        "the pushed (also what happens against replicas running the fake engine, whose "
        "logprobs are not a model's).")
    delivery_samples: int = Field(
        8, ge=1, le=4096, description="Rollouts of each new version the delivery check "
        "recomputes.")
    admin_token: str | None = Field(None, repr=False,
                                    description="Policy admin token (for pushes).")
    promotion: Literal["immediate", "canary"] = Field(
        "immediate", description="How a committed version reaches users: immediate (activated "
        "on every replica once staged) or canary (staged, left inactive: the gateway serves it "
        "to canary_fraction of its traffic, then promotes or drops it; docs/operations.md).")
    canary_wait_seconds: float = Field(
        3900.0, gt=0, le=86400, description="promotion canary: seconds a staged version stays "
        "staged beyond stage_seconds, waiting for the gateway's verdict (keep it above the "
        "gateway's canary_max_seconds); the replicas drop it after that unless promoted.")
    canary_gateway_url: str | None = Field(
        None, description="promotion canary: the gateway whose GET /v1/admin/canary tells why "
        "a version was rolled back (metrics.jsonl canary/reason); without it the outcome is "
        "read from the replicas alone.")
    canary_gateway_key: str | None = Field(
        None, repr=False, description="Admin API key of canary_gateway_url.")
    retry_max_seconds: float = Field(600.0, gt=0, le=86400,
                                     description="Give up waiting on a service after.")
    rpc_timeout_seconds: float = Field(300.0, gt=0, le=86400, description="Deadline of one call.")
    report_to: ReportTo = Field("none", description=REPORT_TO_HELP)
    device: str = Field(
        "auto", description="Where the learner computes: auto (CUDA when available, else CPU), "
        "cpu, cuda (under torchrun: cuda:LOCAL_RANK) or cuda:N.")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Dtype of the learner's matmuls (autocast); auto = bfloat16 on CUDA, "
        "float32 on CPU. bfloat16 is about twice as fast on CPUs with AMX; LoRA weights, "
        "optimizer state and losses stay float32.",
    )
    micro_batch_size: int | None = Field(
        None, ge=1, le=65536, description="Sequences per forward/backward pass: a minibatch is "
        "split into micro batches whose gradients add up (gradient accumulation), so peak "
        "memory follows this, not minibatch_size (default: a rank's whole minibatch share).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the decoder layers' activations in the backward pass "
        "instead of keeping them: less memory, about one more forward pass of time.")
    shard_base: bool = Field(
        False, description="Under torchrun, shard the frozen base model's weights across the "
        "ranks (PyTorch FSDP2 fully_shard) for a base larger than one device; the LoRA weights "
        "stay whole on every rank.")
    # Dynamic sampling and overlong shaping (services/trainer/ppo/sampling.py).
    dynamic_sampling: bool = Field(
        False, description="Drop prompt groups whose rewards are all equal (no group-relative "
        "signal) and refill the step with further prompts (DAPO); grpo and rloo only.")
    max_refill_rounds: int = Field(
        3, ge=0, le=1000, description="Extra draws of prompts a step makes to refill dropped "
        "groups; then it trains on the groups it has.")
    overlong: Literal["none", "penalty", "filter"] = Field(
        "none", description="Completions that reach max_new_tokens: none, penalty (DAPO's soft "
        "overlong punishment over the last overlong_buffer tokens) or filter (out of the loss).")
    overlong_buffer: int = Field(
        8, ge=1, le=32768, description="Tokens before max_new_tokens where the overlong penalty "
        "starts (at most max_new_tokens).")
    overlong_penalty: float = Field(
        1.0, ge=0, le=100, description="Overlong penalty at max_new_tokens (subtracted from the "
        "reward).")
    cpu_cores: CpuList = Field(
        "", description="Run the learner on these CPU cores only, e.g. '4-7' (empty: all). On a "
        "machine shared with a CPU policy, give each its own cores so generation and training "
        "really overlap.",
    )
    # Evaluation during training (services/trainer/ppo/evaluation.py).
    eval_prompts: Path | None = Field(
        None, description="Held-out prompts JSONL (as prompts): each evaluated version generates "
        "on them with its version pinned and is scored on the reward service (none: no eval).")
    eval_every: int = Field(5, ge=1, le=1_000_000, description="Evaluate every N steps (also "
                            "the starting version and the last step's).")
    eval_samples: int = Field(2, ge=1, le=256, description="Completions per eval prompt.")
    eval_temperature: float | None = Field(
        None, ge=0, le=100, description="Sampling temperature of eval (0: greedy; default: "
        "temperature); the seed is fixed, so an evaluation is repeatable.")
    max_eval_drop: float | None = Field(
        None, ge=0, le=1e6, description="Largest drop of the eval reward mean below the promoted "
        "version's that a version may show and still be promoted; with it set, only evaluated "
        "versions are activated for users (none: eval is reported, never blocks).")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from services.trainer.distributed import check_device

        return check_device(value)

    @model_validator(mode="after")
    def _groups(self) -> PPOSettings:
        if self.algo in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"{self.algo} needs samples_per_prompt >= 2 (a group to compare)")
        if self.algo == "ppo" and self.loss_type != "dapo":
            raise ValueError(f"loss_type {self.loss_type!r} is for grpo and rloo; ppo keeps its "
                             "clipped surrogate (loss_type dapo)")
        return self

    @model_validator(mode="after")
    def _evaluation(self) -> PPOSettings:
        if self.max_eval_drop is not None and self.eval_prompts is None:
            raise ValueError("max_eval_drop compares eval rewards: it needs eval_prompts")
        return self

    def clip_bounds(self) -> tuple[float, float]:
        """(clip_low, clip_high): the ratio is clipped to [1 - clip_low, 1 + clip_high]."""
        return (self.clip_range if self.clip_range_low is None else self.clip_range_low,
                self.clip_range if self.clip_range_high is None else self.clip_range_high)

    @model_validator(mode="after")
    def _sampling(self) -> PPOSettings:
        if self.dynamic_sampling and self.algo == "ppo":
            raise ValueError("dynamic_sampling drops groups without a group-relative signal: "
                             "it needs algo grpo or rloo")
        if self.overlong == "penalty" and self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) must be at most "
                             f"max_new_tokens ({self.max_new_tokens})")
        return self

    @field_validator("resume_from")
    @classmethod
    def _resume_from(cls, value: str) -> str:
        if value not in RESUME_POINTS and "\x00" in value:
            raise ValueError("must be last, last_good, best or a checkpoint folder's path")
        return value

    def resume_point(self) -> str | Path:
        """`resume_from` as a named point (last, last_good, best) or a checkpoint folder."""
        return self.resume_from if self.resume_from in RESUME_POINTS else Path(self.resume_from)

    def resolved_model(self) -> Path:
        from rlhf.paths import default_model_dir

        return self.model or default_model_dir()

    def resolved_base_model_id(self) -> str:
        """The id pushes carry: the policy accepts only its own base model's."""
        return self.base_model_id or self.resolved_model().name

    def require_runnable(self) -> None:
        missing = [name for name in ("prompts", "out") if getattr(self, name) is None]
        if not self.policy_addr:
            missing.append("policy_addr")
        if not self.reward_addr:
            missing.append("reward_addr")
        if missing:
            raise ConfigError(f"a run needs {', '.join(missing)}")
