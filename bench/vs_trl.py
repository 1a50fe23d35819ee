"""Our GRPO against TRL's GRPOTrainer on CPU: the same model, the same 64 prompts, the same
reward function, LoRA r=16 on q/k/v/o, 8 prompts x 4 samples x 32 tokens per step, one run after
the other. Prints the median seconds per step and the reward gained per minute of each, and the
ratios ours / TRL's (goals: step time <= 0.5, reward per minute >= 1).

    python bench/vs_trl.py [--steps 10] [--model PATH|tiny] [--cores none|auto|POLICY/TRAINER]

Ours: a vLLM policy (float32, CPU) and a reward service in this process, the reward served by its
user-function mode (`python:bench/vs_trl.py:length_reward`), and the learner (GRPO, float32).
TRL: GRPOTrainer with HF generation in its own virtualenv, $RLHF_HOME/bench/trl-venv, which this
script makes on first use (torch, transformers and peft at this venv's versions, trl pinned):
TRL is a benchmark-only dependency, never installed by `make setup`.

Both sides take one optimizer step per step on its 32 rollouts (our minibatch_size=32 and
ppo_epochs=1; TRL's per_device_train_batch_size=32, num_iterations=1), with the same learning
rate (constant), weight decay, gradient clipping, KL coefficient (k3 in the loss), clip range,
group-normalised advantages, token-mean loss, temperature 1 and seed. TRL runs without gradient
checkpointing (its default is on), in float32 like ours.

A step's time is wall time from the end of the previous step (or the start of training: models
loaded, and for ours the first adapter pushed) to the end of this one. Reward gained = mean
reward of the last k steps minus that of the first k (k = steps // 3, 1 to 3); per minute = over
the summed step times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

TRL_VERSION = "1.13.0"
TARGET_WORDS = 12
PROMPTS = 64
SCRIPT = Path(__file__).resolve()
# Our learner's phases (metrics.jsonl `time/<phase>`), reported as medians.
PHASES = ("generate", "score", "train", "push")


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """1 at TARGET_WORDS words, minus 1/TARGET_WORDS per word away: 32 tokens run to about 25
    words, so the policy gains by ending its answers sooner. TRL's reward-function signature,
    which the reward service's `python:` scorers share; chat completions come as messages."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 - abs(len(t.split()) - TARGET_WORDS) / TARGET_WORDS for t in texts]


def prompt_messages() -> list[list[dict]]:
    """The 64 prompts, fixed: the benchmark questions, then each again as a friend's question."""
    questions = list(C.QUESTIONS) + [f"A friend asks you: {q}" for q in C.QUESTIONS]
    return [[{"role": "user", "content": q}] for q in questions[:PROMPTS]]


def gain_per_minute(rewards: list[float], seconds: list[float]) -> tuple[float, float]:
    """(reward gained, gained per minute of the summed step times)."""
    k = max(1, min(3, len(rewards) // 3))
    gain = sum(rewards[-k:]) / k - sum(rewards[:k]) / k
    minutes = sum(seconds) / 60
    return gain, gain / minutes if minutes else 0.0


# ---------------------------------------------------------------------------------- TRL's side


def trl_venv() -> Path:
    from rlhf.paths import rlhf_home

    return rlhf_home() / "bench" / "trl-venv"


def trl_requirements() -> list[str]:
    import peft
    import torch
    import transformers

    # requests: trl's GRPO trainer imports it without declaring it.
    return [f"torch=={torch.__version__}", f"transformers=={transformers.__version__}",
            f"peft=={peft.__version__}", f"trl=={TRL_VERSION}", "accelerate", "datasets",
            "requests"]


def ensure_trl_python() -> Path:
    """The TRL venv's python, making the venv or installing into it first when it lacks the
    marker of these requirements (an install that did not finish leaves none)."""
    venv = trl_venv()
    python = venv / "bin" / "python"
    marker = venv / "rlhf-bench.json"
    wanted = trl_requirements()
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return python
    print(f"installing TRL into {venv}: {' '.join(wanted)}", flush=True)
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    marker.unlink(missing_ok=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
    subprocess.run([str(python), "-c", "import trl.trainer.grpo_trainer"], check=True)
    marker.write_text(json.dumps(wanted))
    return python


def run_trl_side(config_path: Path) -> None:
    """In the TRL venv: train, then write per-step seconds and rewards to config['result']."""
    cfg = json.loads(config_path.read_text())
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.rewards = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

    clock = Clock()
    args = GRPOConfig(
        output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=1, num_generations=cfg["samples"], num_iterations=1,
        max_completion_length=cfg["tokens"], temperature=1.0, learning_rate=cfg["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        beta=cfg["beta"], epsilon=0.2, scale_rewards="group", loss_type="dapo",
        gradient_checkpointing=False, bf16=False, use_cpu=True, seed=cfg["seed"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        model_init_kwargs={"dtype": "float32"},
    )
    trainer = GRPOTrainer(
        model=cfg["model"], reward_funcs=length_reward, args=args,
        train_dataset=Dataset.from_list([{"prompt": m} for m in cfg["prompts"]]),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        callbacks=[clock],
    )
    trainer.train()
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    Path(cfg["result"]).write_text(json.dumps({"seconds": seconds, "rewards": clock.rewards}))


def run_trl(args, python: Path, model: Path, root: Path) -> dict:
    config = root / "trl.json"
    config.write_text(json.dumps({
        "model": str(model), "prompts": prompt_messages(), "steps": args.steps,
        "samples": args.samples, "tokens": args.tokens, "lr": args.lr, "beta": args.beta,
        "seed": args.seed, "out": str(root / "trl-out"), "result": str(root / "trl-result.json"),
        "batch": args.prompts_per_step * args.samples,
    }))
    # Nothing of this venv may leak into TRL's: its own site-packages only.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    subprocess.run([str(python), str(SCRIPT), "--trl-side", str(config)], check=True, env=env)
    result = json.loads((root / "trl-result.json").read_text())
    result["wall"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------- our side


async def run_ours(args, model: Path, root: Path) -> dict:
    import grpc  # noqa: F401 - fail here, before the engine starts, if the venv lacks it

    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig
    from services.trainer.ppo.learner import Hooks, Learner
    from services.trainer.ppo.settings import PPOSettings

    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in prompt_messages()))
    token = secrets.token_hex(16)
    pcfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=model, data_dir=root / "policy-data", dtype="float32",
        adapter_mode="lora", max_model_len=1024, kv_cache_gib=2.0, max_num_seqs=64,
        admin_token=token, cpu_cores=args.policy_cores)
    policy = await GrpcServer(pcfg, PolicyApp(pcfg)).start()
    rcfg = RewardConfig.load(grpc_port=0, metrics_port=0,
                             scorer=[f"python:{SCRIPT}:length_reward"])
    reward = await GrpcServer(rcfg, RewardApp(rcfg)).start()
    marks: list[float] = []
    rewards: list[float] = []

    def on_state(state: str, message: str) -> None:
        # The last "running" before the first step: the run's start, the first adapter pushed.
        if state == "running" and not rewards:
            marks[:] = [time.perf_counter()]

    phases: dict[str, list[float]] = {}

    def on_metrics(metrics: dict) -> None:
        marks.append(time.perf_counter())
        rewards.append(metrics["reward/mean"])
        for key in PHASES:
            phases.setdefault(key, []).append(metrics.get(f"time/{key}", 0.0))

    try:
        settings = PPOSettings.load(
            None, algo="grpo", model=model, prompts=prompts, out=root / "ours",
            policy_addr=[f"127.0.0.1:{policy.port}"], reward_addr=[f"127.0.0.1:{reward.port}"],
            steps=args.steps, prompts_per_step=args.prompts_per_step,
            samples_per_prompt=args.samples, max_new_tokens=args.tokens, temperature=1.0,
            learning_rate=args.lr, kl_coef=args.beta, clip_range=0.2, ppo_epochs=1,
            minibatch_size=args.prompts_per_step * args.samples, lora_rank=16, lora_alpha=32.0,
            max_staleness=0, seed=args.seed, checkpoint_every=args.steps, admin_token=token,
            adapter_name="vs-trl", device="cpu", compute_dtype="float32",
            cpu_cores=args.trainer_cores)
        start = time.perf_counter()
        await Learner(settings, Hooks(on_metrics=on_metrics, on_state=on_state)).run()
        wall = time.perf_counter() - start
    finally:
        await reward.shutdown()
        await policy.shutdown()
    seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    medians = {key: round(C.median(v), 3) for key, v in phases.items()}
    print("ours, median seconds by phase: "
          + ", ".join(f"{key} {value:.2f}" for key, value in medians.items()), flush=True)
    return {"seconds": seconds, "rewards": rewards, "wall": wall, "phases": medians}


# ---------------------------------------------------------------------------------- both


def resolve_model(spec: str | None, root: Path) -> Path:
    if spec == "tiny":
        from rlhf.models.tiny import make_tiny_model

        return make_tiny_model(root / "tiny")
    return Path(spec) if spec else C.default_model()


def summarise(name: str, run: dict) -> dict:
    gain, per_minute = gain_per_minute(run["rewards"], run["seconds"])
    median = C.median(run["seconds"])
    print(f"{name:4s}: {median:7.2f} s/step (median of {len(run['seconds'])}), reward "
          f"{run['rewards'][0]:+.3f} -> {run['rewards'][-1]:+.3f}, gained {gain:+.3f} "
          f"= {per_minute:+.4f}/min; total {run['wall']:.1f} s", flush=True)
    return {"seconds_per_step": round(median, 3), "reward_gain": round(gain, 4),
            "reward_gain_per_minute": round(per_minute, 4), "wall_seconds": round(run["wall"], 1),
            "step_seconds": [round(s, 3) for s in run["seconds"]],
            "rewards": [round(r, 4) for r in run["rewards"]],
            **({"phase_seconds": run["phases"]} if "phases" in run else {})}


def main(args) -> None:
    from ppo_step import split_cores

    root = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    args.policy_cores, args.trainer_cores = split_cores(args.cores)
    try:
        trl_python = ensure_trl_python()  # before our run: a failed install wastes nothing
        model = resolve_model(args.model, root)
        print(f"model {model}; {args.steps} steps of {args.prompts_per_step} prompts x "
              f"{args.samples} samples x {args.tokens} tokens; lr {args.lr}, beta {args.beta}; "
              f"cores: policy {args.policy_cores or 'all'}, learner "
              f"{args.trainer_cores or 'all'}, TRL all", flush=True)
        ours = asyncio.run(run_ours(args, model, root))
        trl = run_trl(args, trl_python, model, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = {"ours": summarise("ours", ours), "trl": summarise("trl", trl)}
    step_ratio = figures["ours"]["seconds_per_step"] / figures["trl"]["seconds_per_step"]
    trl_rate = figures["trl"]["reward_gain_per_minute"]
    gain_ratio = figures["ours"]["reward_gain_per_minute"] / trl_rate if trl_rate else None
    print(f"step time ours/TRL {step_ratio:.3f} (goal <= 0.5); reward gained per minute "
          f"ours/TRL {'n/a (TRL gained nothing)' if gain_ratio is None else f'{gain_ratio:.3f}'}"
          " (goal >= 1)")
    C.report("vs_trl", {
        "model": str(args.model or C.default_model()), "steps": args.steps,
        "prompts_per_step": args.prompts_per_step, "samples": args.samples,
        "tokens": args.tokens, "lr": args.lr, "beta": args.beta, "trl_version": TRL_VERSION,
        "policy_cores": args.policy_cores, "trainer_cores": args.trainer_cores,
        **figures, "step_time_ratio": round(step_ratio, 4),
        "reward_per_minute_ratio": None if gain_ratio is None else round(gain_ratio, 4),
    })


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-side":
        run_trl_side(Path(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default=None,
                        help="Model folder (default: the prepared SmolLM2), or 'tiny' for the "
                        "random test model built here")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="Learning rate (both sides)")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient (both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cores", default="none",
                        help="Our side's: none (all cores to the policy and to the learner), "
                        "auto (split in two) or POLICY/LEARNER cpulists; TRL, one process, "
                        "always has every core")
    main(parser.parse_args())
