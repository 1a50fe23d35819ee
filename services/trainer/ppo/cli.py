"""`rlhf train ppo`: the learner as a batch job, with a live progress bar.

Data parallel on one node: `torchrun --nproc-per-node N -m rlhf.cli train ppo ...` (gloo; the
learner computes on CPU). Rank 0 talks to the services, writes the run folder and shows progress;
the other ranks share the forward and backward passes (see services/trainer/distributed.py).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import click

from rlhf.plumbing.config import ConfigError


def _progress_hooks(total: int, start: int):
    from tqdm import tqdm

    from services.trainer.learner import Hooks

    bar = tqdm(total=total, initial=start, desc="ppo", unit="step", dynamic_ncols=True)

    def on_metrics(m: dict) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m['kl']:.3f}",
                        v=m["adapter_version"], refresh=True)

    def on_state(state: str, message: str) -> None:
        bar.set_description("ppo (waiting)" if state == "waiting" else "ppo")
        if message:
            bar.write(message)

    def on_event(kind: str, message: str) -> None:
        if kind == "push_failed":
            bar.write(f"push failed: {message}")

    return bar, Hooks(on_metrics=on_metrics, on_event=on_event, on_state=on_state)


@click.command("ppo", help="PPO / GRPO / RLOO against running policy and reward services.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Run YAML (keys as the flags, with underscores); flags override it.")
@click.option("--model", type=click.Path(path_type=Path), help="Base model folder.")
@click.option("--init-adapter", type=click.Path(path_type=Path), help="SFT adapter to start from.")
@click.option("--policy-addr", multiple=True, help="Policy replica host:port (repeatable) or "
              "a dns:/// name.")
@click.option("--reward-addr", multiple=True, help="Reward host:port (repeatable) or dns:///.")
@click.option("--prompts", type=click.Path(path_type=Path), help="Prompts JSONL.")
@click.option("--algo", type=click.Choice(["ppo", "grpo", "rloo"]))
@click.option("--steps", type=int)
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (resumes if it holds "
              "a checkpoint).")
@click.option("--prompts-per-step", type=int)
@click.option("--samples-per-prompt", type=int)
@click.option("--max-new-tokens", type=int)
@click.option("--learning-rate", type=float)
@click.option("--kl-coef", type=float)
@click.option("--max-staleness", type=int)
@click.option("--seed", type=int)
@click.option("--admin-token", envvar="RLHF_POLICY_ADMIN_TOKEN", help="Policy admin token.")
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16"]),
              help="Dtype of the learner's matmuls (bfloat16: autocast, ~2x faster on AMX CPUs).")
@click.option("--cpu-cores", help="Run the learner on these cores only, e.g. 4-7 (a CPU shared "
              "with the policy: give each its own).")
def train_ppo(config_file, **flags) -> None:
    from services.trainer.checkpoint import latest
    from services.trainer.distributed import process_group
    from services.trainer.jsonl import DataError
    from services.trainer.learner import Learner
    from services.trainer.settings import RunSettings

    flags["policy_addr"] = list(flags["policy_addr"]) or None
    flags["reward_addr"] = list(flags["reward_addr"]) or None
    try:
        settings = RunSettings.load(config_file, **flags)
        settings.require_runnable()
    except (ConfigError, DataError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from None
    # Under torchrun the other ranks wait in a collective while rank 0 generates, scores and
    # pushes, which may include waiting out an unavailable service: allow for that.
    timeout = timedelta(seconds=max(1800.0, 4 * (settings.retry_max_seconds
                                                 + settings.rpc_timeout_seconds)))
    with process_group("gloo", timeout) as world:
        bar = None
        try:
            hooks = None
            if world.is_main:
                done = 0
                if latest(settings.out) is not None:
                    done = int(latest(settings.out).name.split("-")[1])
                    click.echo(f"resuming {settings.out} after step {done}", err=True)
                bar, hooks = _progress_hooks(settings.steps, done)
            learner = Learner(settings, hooks, world)
        except (ConfigError, DataError, FileNotFoundError) as exc:
            raise click.UsageError(str(exc)) from None
        try:
            asyncio.run(learner.run())
        except KeyboardInterrupt:
            click.echo("\ninterrupted; the last checkpoint is kept, run again to resume",
                       err=True)
            sys.exit(130)
        finally:
            if bar is not None:
                bar.close()
    if world.is_main:
        click.echo(str(settings.out / "metrics.jsonl"))
