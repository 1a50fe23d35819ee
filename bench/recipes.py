"""Learning evidence for the training recipes: reward gained in N steps (30 by default) on the
default model with a rule reward, for GRPO with each loss_type and for PPO, each with the
mismatch correction off (`none`) and at the learner's default, all in one run, one after the
other, on one policy server and one reward server. Prints a table of reward at the start (mean
of the first 3 steps), at the end (mean of the last 3) and the gain, then one JSON line.

    python bench/recipes.py [--steps 30] [--configs grpo:none,ppo:default,...|all]
        [--prompts-per-step 2 --samples 4 --tokens 16] [--seed 0] [--model PATH|tiny]

A config is LOSS:MISMATCH: LOSS is a GRPO loss_type (grpo, dapo, dr_grpo, gspo, cispo) or `ppo`
(critic + GAE, its own clipped surrogate); MISMATCH is `none` or `default` (the setting's
default, named in the output). The default list is the ten of grpo, dapo, dr_grpo, gspo and ppo;
`all` adds cispo.

The reward is `rule:length?target=8&unit=words` (1 at 8 words, down to 0 at 0 and 16 words): in
16 tokens SmolLM2's answers run to about 12 words and are cut, so a policy gains by answering in
a short sentence and ending it. Rollouts come from vLLM in bfloat16 (`--policy-dtype`), the
learner computes in float32: the mismatch the correction is for. Every config starts from the
same fresh LoRA (r=16, q/k/v/o) with the same seed and the same prompt order; one optimizer
step per step (minibatch = the step's rollouts, one epoch), learning rate 1e-3, KL coefficient
0.05, temperature 1, strictly on-policy (max_staleness=0).

The defaults are sized for the ten default configs to take about 40 minutes on a quiet 2-core
machine: `bench/vs_trl.py` measured 38 s per GRPO step of 8 prompts x 4 samples x 32 tokens
there; a step of 2 x 4 x 16 is about a fifth of that work (PPO's critic adds about half).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import _common as C

GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo")
MISMATCH = ("none", "default")
DEFAULT_CONFIGS = [f"{loss}:{m}" for loss in ("grpo", "dapo", "dr_grpo", "gspo", "ppo")
                   for m in MISMATCH]
ALL_CONFIGS = [f"{loss}:{m}" for loss in (*GRPO_LOSSES, "ppo") for m in MISMATCH]
TARGET_WORDS = 8
WINDOW = 3  # steps averaged at the start and at the end


def parse_configs(spec: str) -> list[str]:
    """'all', or comma-separated LOSS:MISMATCH names (SystemExit naming a bad one)."""
    if spec == "all":
        return list(ALL_CONFIGS)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    bad = [name for name in names if name not in ALL_CONFIGS]
    if bad or not names:
        raise SystemExit(f"unknown config(s) {', '.join(bad) or '(none)'}; known: "
                         f"{', '.join(ALL_CONFIGS)} or all")
    return names


def overrides(name: str) -> dict:
    """The PPOSettings fields a config sets (the rest are the bench's common ones)."""
    loss, _, mismatch = name.partition(":")
    values: dict = {"algo": "ppo"} if loss == "ppo" else {"algo": "grpo", "loss_type": loss}
    if mismatch == "none":
        values["mismatch_correction"] = "none"
    return values


def start_end_gain(rewards: list[float]) -> tuple[float, float, float]:
    """(mean of the first WINDOW steps, mean of the last WINDOW, their difference); the window
    shrinks to half the steps (at least 1) for short runs."""
    k = max(1, min(WINDOW, len(rewards) // 2))
    start = sum(rewards[:k]) / k
    end = sum(rewards[-k:]) / k
    return start, end, end - start


async def run_config(args, name: str, model: Path, prompts: Path, root: Path, policy: str,
                     reward: str, token: str) -> dict:
    from services.trainer.ppo.learner import Hooks, Learner
    from services.trainer.ppo.settings import PPOSettings

    rewards: list[float] = []
    seconds: list[float] = []
    settings = PPOSettings.load(
        None, model=model, prompts=prompts, out=root / name.replace(":", "-"),
        policy_addr=[policy], reward_addr=[reward], steps=args.steps,
        prompts_per_step=args.prompts_per_step, samples_per_prompt=args.samples,
        max_new_tokens=args.tokens, temperature=1.0, learning_rate=args.lr, kl_coef=args.beta,
        ppo_epochs=1, minibatch_size=args.prompts_per_step * args.samples, lora_rank=16,
        lora_alpha=32.0, max_staleness=0, seed=args.seed, checkpoint_every=args.steps,
        keep_checkpoints=1, admin_token=token, adapter_name=f"recipe-{name.replace(':', '-')}",
        device="cpu", compute_dtype="float32", **overrides(name))

    def on_metrics(metrics: dict) -> None:
        rewards.append(metrics["reward/mean"])
        seconds.append(metrics["time/step"])
        print(f"  {name} step {metrics['step']:3d}: reward {metrics['reward/mean']:.3f}",
              flush=True)

    start = time.perf_counter()
    await Learner(settings, Hooks(on_metrics=on_metrics)).run()
    wall = time.perf_counter() - start
    first, last, gain = start_end_gain(rewards)
    return {"algo": settings.algo, "loss_type": settings.loss_type,
            "mismatch_correction": settings.mismatch_correction,
            "start": round(first, 4), "end": round(last, 4), "gain": round(gain, 4),
            "seconds_per_step": round(C.median(seconds), 3), "wall_seconds": round(wall, 1),
            "rewards": [round(r, 4) for r in rewards]}


async def run_all(args, model: Path, root: Path) -> dict[str, dict]:
    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q in C.QUESTIONS))
    token = secrets.token_hex(16)
    pcfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=model, data_dir=root / "policy-data",
        dtype=args.policy_dtype, adapter_mode="lora", max_model_len=1024, kv_cache_gib=2.0,
        max_num_seqs=64, admin_token=token)
    policy = await GrpcServer(pcfg, PolicyApp(pcfg)).start()
    rcfg = RewardConfig.load(grpc_port=0, metrics_port=0, scorer=[args.reward])
    reward = await GrpcServer(rcfg, RewardApp(rcfg)).start()
    runs = {}
    try:
        for name in args.configs:
            runs[name] = await run_config(args, name, model, prompts, root,
                                          f"127.0.0.1:{policy.port}",
                                          f"127.0.0.1:{reward.port}", token)
    finally:
        await reward.shutdown()
        await policy.shutdown()
    return runs


def table(runs: dict[str, dict]) -> list[str]:
    lines = [f"{'config':18s} {'algo':5s} {'loss_type':9s} {'mismatch':9s} {'start':>7s} "
             f"{'end':>7s} {'gain':>7s} {'s/step':>7s}"]
    for name, r in runs.items():
        lines.append(f"{name:18s} {r['algo']:5s} {r['loss_type']:9s} "
                     f"{r['mismatch_correction']:9s} {r['start']:7.3f} {r['end']:7.3f} "
                     f"{r['gain']:+7.3f} {r['seconds_per_step']:7.2f}")
    return lines


def main(args) -> None:
    from vs_trl import resolve_model

    args.configs = parse_configs(args.configs)
    root = Path(tempfile.mkdtemp(prefix="recipes-"))
    try:
        model = resolve_model(args.model, root)
        print(f"model {model}; {len(args.configs)} configs x {args.steps} steps of "
              f"{args.prompts_per_step} prompts x {args.samples} samples x {args.tokens} tokens; "
              f"seed {args.seed}, lr {args.lr}, beta {args.beta}; reward {args.reward}; policy "
              f"{args.policy_dtype}, learner float32", flush=True)
        runs = asyncio.run(run_all(args, model, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for line in table(runs):
        print(line)
    best = max(runs, key=lambda name: runs[name]["gain"])
    print(f"largest gain: {best} ({runs[best]['gain']:+.3f}), seed {args.seed}")
    C.report("recipes", {
        "model": str(args.model or C.default_model()), "steps": args.steps,
        "prompts_per_step": args.prompts_per_step, "samples": args.samples,
        "tokens": args.tokens, "lr": args.lr, "beta": args.beta, "seed": args.seed,
        "policy_dtype": args.policy_dtype, "reward": args.reward, "window": WINDOW,
        "runs": runs, "best": best,
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="Comma-separated LOSS:MISMATCH names, or all")
    parser.add_argument("--model", default=None,
                        help="Model folder (default: the prepared SmolLM2), or 'tiny' for the "
                        "random test model built here")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="vLLM's weights dtype (the learner computes in float32)")
    parser.add_argument("--reward", default=f"rule:length?target={TARGET_WORDS}&unit=words",
                        help="Reward scorer spec")
    main(parser.parse_args())
