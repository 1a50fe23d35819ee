"""`rlhf train ppo`: the learner as a batch job, with a live progress bar.

Data parallel: `torchrun --nproc-per-node N -m rlhf.cli train ppo ...` on one node, the same with
`--nnodes M` and a rendezvous endpoint on several (NCCL and cuda:$LOCAL_RANK on GPUs, gloo on the
CPU; `--shard-base` shards the frozen base across the ranks). Rank 0 talks to the services, writes
the run folder and shows progress; the other ranks share the forward and backward passes (see
services/trainer/distributed.py).
Flags override the keys of `--config` (a YAML of PPOSettings keys), which override the defaults.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import click

from rlhf.plumbing.config import ConfigError
from services.trainer.ppo.settings import PPOSettings
from services.trainer.settings import option


def _progress_hooks(total: int, start: int):
    from tqdm import tqdm

    from services.trainer.ppo.learner import Hooks

    bar = tqdm(total=total, initial=start, desc="ppo", unit="step", dynamic_ncols=True)

    def on_metrics(m: dict) -> None:
        bar.update(1)
        kl = {"kl": f"{m['kl/ref']:.3f}"} if "kl/ref" in m else {}  # no reference pass: none
        bar.set_postfix(reward=f"{m['reward/mean']:.3f}", **kl, v=m["adapter/version"],
                        refresh=True)
        if "eval/reward_mean" in m:
            verdict = "promoted" if m["eval/promoted"] else "not promoted"
            bar.write(f"eval v{m['eval/version']}: reward {m['eval/reward_mean']:.3f} "
                      f"± {m['eval/reward_std']:.3f}, {verdict} ({m['eval/reason']})")

    def on_state(state: str, message: str) -> None:
        bar.set_description("ppo (waiting)" if state == "waiting" else "ppo")
        if message:
            bar.write(message)

    def on_event(kind: str, message: str) -> None:
        if kind == "push_failed":
            bar.write(f"push failed: {message}")

    return bar, Hooks(on_metrics=on_metrics, on_event=on_event, on_state=on_state)


def _flag(name: str, *decls: str, **kwargs):
    return option(PPOSettings, name, *decls, overlay=True, **kwargs)


@click.command("ppo", help="PPO / GRPO / RLOO against running policy and reward services.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Run YAML (keys as the flags, with underscores); flags override it.")
@_flag("model")
@_flag("init_adapter")
@_flag("policy_addr")
@_flag("reward_addr")
@_flag("prompts")
@_flag("algo")
@_flag("steps")
@_flag("out")
@_flag("prompts_per_step")
@_flag("samples_per_prompt")
@_flag("max_new_tokens")
@_flag("learning_rate")
@_flag("kl_coef")
@_flag("kl_estimator")
@_flag("loss_type")
@_flag("clip_range_low")
@_flag("clip_range_high")
@_flag("mismatch_correction")
@_flag("mismatch_threshold")
@_flag("max_staleness")
@_flag("dynamic_sampling")
@_flag("overlong")
@_flag("checkpoint_every")
@_flag("keep_checkpoints")
@_flag("resume_from")
@_flag("max_update_norm")
@_flag("on_bad_step")
@_flag("max_bad_steps")
@_flag("eval_prompts")
@_flag("eval_every")
@_flag("eval_samples")
@_flag("eval_temperature")
@_flag("max_eval_drop")
@_flag("seed")
@_flag("admin_token", envvar="RLHF_POLICY_ADMIN_TOKEN")
@_flag("promotion")
@_flag("stage_seconds")
@_flag("delivery_threshold")
@_flag("report_to")
@_flag("device")
@_flag("compute_dtype")
@_flag("micro_batch_size")
@_flag("gradient_checkpointing")
@_flag("shard_base")
@_flag("cpu_cores")
def train_ppo(config_file, **flags) -> None:
    from services.trainer.data import DataError
    from services.trainer.distributed import backend_for, process_group
    from services.trainer.ppo.checkpoint import latest, step_of
    from services.trainer.ppo.gates import GateFailed
    from services.trainer.ppo.learner import Learner

    flags["policy_addr"] = list(flags["policy_addr"]) or None
    flags["reward_addr"] = list(flags["reward_addr"]) or None
    try:
        settings = PPOSettings.load(config_file, **flags)
        settings.require_runnable()
    except (ConfigError, DataError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from None
    # Under torchrun the other ranks wait in a collective while rank 0 generates, scores and
    # pushes, which may include waiting out an unavailable service: allow for that.
    timeout = timedelta(seconds=max(1800.0, 4 * (settings.retry_max_seconds
                                                 + settings.rpc_timeout_seconds)))
    try:
        backend = backend_for(settings.device)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    with process_group(backend, timeout) as world:
        bar = None
        try:
            learner = Learner(settings, None, world)
            if world.is_main:
                done = 0
                start = learner.resume_from or latest(settings.out)
                if start is not None:
                    done = step_of(start)
                    click.echo(f"resuming {settings.out} after step {done} ({start})", err=True)
                bar, learner.hooks = _progress_hooks(settings.steps, done)
        except (ConfigError, DataError, FileNotFoundError) as exc:
            raise click.UsageError(str(exc)) from None
        try:
            asyncio.run(learner.run())
        except KeyboardInterrupt:
            click.echo("\ninterrupted; the last checkpoint is kept, run again to resume",
                       err=True)
            sys.exit(130)
        except GateFailed as exc:
            if bar is not None:
                bar.close()
                bar = None
            click.echo(f"run failed: {exc}", err=True)
            sys.exit(1)
        finally:
            if bar is not None:
                bar.close()
    if world.is_main:
        click.echo(str(settings.out / "metrics.jsonl"))
