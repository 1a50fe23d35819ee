"""Seconds per PPO step by phase on the default model (policy + reward services on 127.0.0.1),
and the wall time per step with overlap on (max_staleness=1: generation of step k+1 runs while
step k trains) divided by strictly on-policy (max_staleness=0). Target <= 0.75.

    python bench/ppo_step.py [--steps 4 --prompts-per-step 8 --samples 4 --tokens 32]
        [--cores auto|none|POLICY/TRAINER]

Overlap pays when generation and training have their own hardware, as on GPU nodes where the
policy and the trainer are separate pods. On one CPU they would otherwise fight over the same
cores, so by default (`--cores auto`) the policy gets the first half of the cores and the learner
the rest (e.g. 0/1 on two cores), in both modes alike; `--cores none` lets both use every core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import _common as C

RULE = "rule:length?target=40&unit=words"


def split_cores(spec: str) -> tuple[str, str]:
    """'auto' -> first half / second half of this process's cores; 'none' -> ('', '')."""
    import os

    if spec == "none":
        return "", ""
    if spec == "auto":
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return "", ""
        half = len(cores) // 2
        return ",".join(map(str, cores[:half])), ",".join(map(str, cores[half:]))
    policy, _, trainer = spec.partition("/")
    return policy, trainer


async def run_learner(args, policy_addr, reward_addr, prompts, out: Path, staleness: int):
    from services.trainer.ppo.learner import Learner
    from services.trainer.ppo.settings import PPOSettings

    settings = PPOSettings.load(
        None, model=C.default_model(), prompts=prompts, out=out, policy_addr=[policy_addr],
        reward_addr=[reward_addr], steps=args.steps, prompts_per_step=args.prompts_per_step,
        samples_per_prompt=args.samples, max_new_tokens=args.tokens, max_staleness=staleness,
        adapter_name=out.name, algo="ppo", ppo_epochs=1, minibatch_size=8,
        cpu_cores=args.trainer_cores, compute_dtype=args.trainer_dtype,
    )
    start = time.perf_counter()
    await Learner(settings).run()
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, rows


async def main(args) -> None:
    from rlhf.plumbing.server import GrpcServer
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    root = Path(tempfile.mkdtemp())
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in C.QUESTIONS))
    args.policy_cores, args.trainer_cores = split_cores(args.cores)
    policy, channel = await C.start_policy("lora", args.dtype, cpu_cores=args.policy_cores)
    await channel.close()
    rcfg = RewardConfig.load(grpc_port=0, metrics_port=0, scorer=[RULE])
    reward = await GrpcServer(rcfg, RewardApp(rcfg)).start()
    paddr, raddr = f"127.0.0.1:{policy.port}", f"127.0.0.1:{reward.port}"
    try:
        results = {}
        for staleness in (0, 1):
            wall, rows = await run_learner(args, paddr, raddr, prompts,
                                           root / f"stale{staleness}", staleness)
            # The first step includes model loading and the initial push: leave it out.
            results[staleness] = (wall, rows)
    finally:
        await reward.shutdown()
        await policy.shutdown()
    on_rows = results[0][1]
    phases = {p: sum(r[f"time/{p}"] for r in on_rows) / len(on_rows)
              for p in ("generate", "score", "train", "push")}
    per_step = {s: results[s][0] / args.steps for s in results}
    ratio = per_step[1] / per_step[0]
    for phase, seconds in phases.items():
        print(f"{phase:9s} {seconds:7.2f} s/step (on-policy)")
    print(f"cores: policy {args.policy_cores or 'all'}, trainer {args.trainer_cores or 'all'}")
    print(f"wall per step: on-policy {per_step[0]:.2f} s, overlap {per_step[1]:.2f} s, "
          f"ratio {ratio:.3f} (target <= 0.75)")
    C.report("ppo_step", {
        "steps": args.steps, "prompts_per_step": args.prompts_per_step, "samples": args.samples,
        "tokens": args.tokens, "dtype": args.dtype,
        "trainer_dtype": args.trainer_dtype, "policy_cores": args.policy_cores,
        "trainer_cores": args.trainer_cores,
        **{f"{p}_seconds": round(v, 3) for p, v in phases.items()},
        "wall_per_step_on_policy": round(per_step[0], 3),
        "wall_per_step_overlap": round(per_step[1], 3),
        "overlap_over_on_policy": round(ratio, 3),
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--trainer-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="The learner's compute dtype (the policy's is --dtype)")
    parser.add_argument("--cores", default="auto",
                        help="auto (split in two), none (share all), or POLICY/TRAINER cpulists")
    asyncio.run(main(parser.parse_args()))
