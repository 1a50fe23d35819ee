"""A run's per-step figures: their keys in metrics.jsonl (grouped by kind, cleanrl-style:
`reward/mean`, `loss/policy`, `kl/ref`, `time/generate`, ...), the wire's StepMetrics fields they
fill, and the Prometheus gauges they set (whose names and labels are the wire's field names)."""

from __future__ import annotations

from rlhf.plumbing import metrics as m
from rlhf.v1 import trainer_pb2

# metrics.jsonl key -> StepMetrics field. `step` is the x axis of every figure.
PROTO_FIELDS = {
    "step": "step",
    "reward/mean": "reward_mean",
    "reward/std": "reward_std",
    "kl/ref": "kl",                        # KL(policy || reference) per sequence, nats
    "kl/coef": "kl_coef",                  # the penalty coefficient in effect
    "kl/approx": "approx_kl",              # KL between the policy before and after the update
    "loss/policy": "policy_loss",
    "loss/value": "value_loss",
    "policy/entropy": "entropy",
    "policy/clipfrac": "clipfrac",
    "policy/logprob_mismatch": "logprob_mismatch",  # |vLLM's - the trainer's| logprobs
    "adapter/version": "adapter_version",
    "adapter/staleness": "staleness",
    "time/generate": "generate_seconds",
    "time/score": "score_seconds",
    "time/train": "train_seconds",
    "time/push": "push_seconds",
    "time/step": "step_seconds",
    "throughput/samples_per_s": "samples_per_second",
    "memory/peak_gb": "peak_memory_gb",    # CUDA max allocated, or the process's peak RSS
    # pi_learner_old / pi_vllm on the sampled tokens (services/trainer/losses.py)
    "mismatch/ratio_mean": "mismatch_ratio_mean",
    "mismatch/ratio_max": "mismatch_ratio_max",
    "mismatch/masked_share": "mismatch_masked_share",  # dropped by the MIS correction
    "mismatch/kl": "mismatch_kl",          # KL(pi_vllm || pi_learner_old) per token, nats
}
# In metrics.jsonl only (no wire field): mean completion length in tokens, and the passes of the
# step by kind, in whole-batch units (services/trainer/ppo/update.py).
FILE_ONLY = ("policy/response_length", "passes/forward_policy", "passes/forward_ref",
             "passes/forward_value", "passes/backward_policy", "passes/backward_value")

# In metrics.jsonl and as gauges of their own (no wire field): the latest evaluation of a version
# on the held-out prompts, and whether it was promoted (services/trainer/ppo/evaluation.py).
EVAL_KEYS = ("eval/version", "eval/reward_mean", "eval/reward_std", "eval/samples",
             "eval/promoted", "eval/reason", "eval/baseline_version", "eval/baseline_reward_mean",
             "eval/baseline_reward_std")

_GAUGED = {"reward/mean", "kl/ref", "step", "adapter/version"}  # gauges of their own
_PHASES = ("generate", "score", "train", "push")


def to_proto(metrics: dict) -> trainer_pb2.StepMetrics:
    return trainer_pb2.StepMetrics(**{field: metrics[key] for key, field in PROTO_FIELDS.items()
                                      if key in metrics})


class TrainerMetrics:
    """The trainer's Prometheus figures of the latest step."""

    def __init__(self) -> None:
        self.step = m.gauge("rlhf_trainer_step", "Steps completed by the current run")
        self.version = m.gauge("rlhf_trainer_adapter_version", "Latest adapter version pushed")
        self.reward = m.gauge("rlhf_trainer_reward_mean", "Mean reward of the latest step")
        self.kl = m.gauge("rlhf_trainer_kl", "Mean KL to the reference, latest step (nats)")
        self.figure = m.gauge("rlhf_trainer_step_figure", "Other per-step figures", ("name",))
        self.phase = m.gauge("rlhf_trainer_phase_seconds", "Seconds per phase, latest step",
                             ("phase",))
        self.push_failures = m.counter("rlhf_trainer_push_failures", "Replica push refusals")
        self.waiting = m.gauge("rlhf_trainer_waiting", "1 while a run waits for a service")
        self.eval_mean = m.gauge("rlhf_trainer_eval_reward_mean",
                                 "Eval reward mean of the latest evaluated version")
        self.eval_std = m.gauge("rlhf_trainer_eval_reward_std",
                                "Eval reward std of the latest evaluated version")
        self.eval_version = m.gauge("rlhf_trainer_eval_version", "Latest evaluated version")
        self.promoted_mean = m.gauge("rlhf_trainer_eval_promoted_reward_mean",
                                     "Eval reward mean of the promoted version")
        self.promoted_version = m.gauge("rlhf_trainer_eval_promoted_version",
                                        "Newest version promoted by its evaluation")
        self.eval_refused = m.counter("rlhf_trainer_eval_refused",
                                      "Evaluated versions refused by the eval gate")

    def record(self, metrics: dict) -> None:
        self.step.set(metrics["step"])
        self.version.set(metrics["adapter/version"])
        self.reward.set(metrics["reward/mean"])
        if "kl/ref" in metrics:  # absent when no KL coefficient needs the reference pass
            self.kl.set(metrics["kl/ref"])
        for key, field in PROTO_FIELDS.items():
            if key not in _GAUGED and not key.startswith("time/") and key in metrics:
                self.figure.labels(field).set(metrics[key])
        for phase in _PHASES:
            self.phase.labels(phase).set(metrics[f"time/{phase}"])
        self.record_eval(metrics)

    def record_eval(self, metrics: dict) -> None:
        if "eval/baseline_version" in metrics:  # the promoted version the step compared with
            self.promoted_mean.set(metrics["eval/baseline_reward_mean"])
            self.promoted_version.set(metrics["eval/baseline_version"])
        if "eval/reward_mean" in metrics:
            self.eval_mean.set(metrics["eval/reward_mean"])
            self.eval_std.set(metrics["eval/reward_std"])
            self.eval_version.set(metrics["eval/version"])
            if metrics["eval/promoted"]:
                self.promoted_mean.set(metrics["eval/reward_mean"])
                self.promoted_version.set(metrics["eval/version"])
            else:
                self.eval_refused.inc()
