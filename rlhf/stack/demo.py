"""`rlhf demo` (`make demo`): the whole loop on the default model, in one go, on a laptop CPU.

1. Reward model: all-MiniLM-L6-v2 (from PyPI) trained on sentiment-rated movie-review pairs
   (`rlhf data sentiment-pairs`, `rlhf train rm`); cached under $RLHF_HOME/demo and reused.
2. The stack: policy (vLLM, SmolLM2-135M-Instruct), reward (that model plus a length rule),
   trainer and gateway, started by the same supervisor as `rlhf up`.
3. A best-of-n question to the gateway before training (base model).
4. PPO through TrainerService, with live progress from WatchRun; every step's adapter is pushed
   by the trainer into the running policy (hot reload, no restart).
5. The same question after training (the newest adapter), both answers with their scores, a PNG
   plot of reward and KL per step, and a summary (JSON and text) in the run folder.

The reward is a weighted sum: positive sentiment (the learned model) plus a length rule that
asks for about 12 words. SmolLM2 rambles past 30 words, so the length part rises within a few
steps and makes the learning visible on a CPU; the sentiment part moves more slowly.

The stages themselves are in `demo_stages`, what is shown and written in `demo_report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from rlhf.stack.demo_stages import (
    QUESTION,
    SYSTEM,
    DemoPlan,
    ask,
    read_rm_history,
    reward_model,
    rlhf_command,
    run_step,
    train,
)
from rlhf.stack.plan import DEFAULT_PROMPTS

# Merged adapter mode: vLLM's CPU LoRA path runs at a fraction of base speed, and the demo only
# asks the base model before training and the newest adapter after. A stack file (--config) may
# change any of it.
DEMO_SECTIONS = {"policy": {"adapter_mode": "merged", "max_model_len": 1024}}


def write_prompts(path: Path) -> Path:
    """The training prompts: movie-review requests, each with the demo's system turn."""
    path.write_text("".join(
        json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": p}]}) + "\n"
        for p in DEFAULT_PROMPTS))
    return path


def thread_env() -> dict[str, str]:
    """Two cores and four processes: the reward model runs single-threaded (torch's default of
    all cores under contention was measured 5-30x slower)."""
    return {"RLHF_REWARD_THREADS": os.environ.get("RLHF_REWARD_THREADS", "1")}


async def run_demo(plan: DemoPlan, run_dir: Path, model: Path | None, console,
                   retrain_rm: bool, policy_replicas: int,
                   reward_model_dir: Path | None = None,
                   stack_config: Path | None = None) -> dict:
    from rlhf.paths import default_model_dir
    from rlhf.stack.demo_report import plot, rise, show_answer, summary_text
    from rlhf.stack.plan import UpOptions, merge_sections
    from rlhf.stack.rundir import prepare, read_stack_config, trainer_token
    from rlhf.stack.supervisor import ServiceFailed, Stack

    started = time.monotonic()
    timings: dict[str, float] = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1. Reward model")
    t = time.monotonic()
    if reward_model_dir is not None:
        rm_dir = reward_model_dir.resolve()
        rm_history = read_rm_history(rm_dir)
        console.print(f"Reward model: {rm_dir} (given)")
    else:
        rm_dir, rm_history = await reward_model(plan, run_dir, console, retrain_rm)
    timings["reward_model_seconds"] = time.monotonic() - t

    plan.scorers = [f"rm:{rm_dir}",
                    f"{plan.length_weight}*rule:length?target={plan.length_target}&unit=words"]
    console.rule("[bold]2. The stack")
    console.print(f"reward = {' + '.join(plan.scorers)}", highlight=False)
    opts = UpOptions(run_dir=run_dir, model=model, policy_replicas=policy_replicas,
                     scorers=plan.scorers, prompts=write_prompts(run_dir / "prompts.jsonl"),
                     overrides=merge_sections(DEMO_SECTIONS, read_stack_config(stack_config)),
                     extra_env=thread_env())
    stack = Stack(prepare(opts), opts, console)
    t = time.monotonic()
    try:
        await stack.start()
    except ServiceFailed as exc:
        console.print(f"[red]✗ {exc}[/red]; last lines of {stack.by_name[exc.name].log}:")
        console.print(exc.log_tail, markup=False, highlight=False)
        await stack.stop()
        raise click.exceptions.Exit(1) from None
    except BaseException:  # Ctrl-C during start-up
        await stack.stop()
        raise
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(stack.supervise(stop))
    try:
        timings["stack_start_seconds"] = time.monotonic() - t
        console.print(f"stack up in {timings['stack_start_seconds']:.0f}s:\n{stack.urls_text()}",
                      highlight=False)

        console.rule("[bold]3. Best-of-n before training")
        # "policy" = the active adapter; none yet, so the base model answers (merged adapter
        # mode serves only the active weights).
        before = await ask(stack.gateway_url, plan, "policy")
        show_answer(console, f"{QUESTION!r}: best of {plan.n}, {before['model']} model", before)

        console.rule("[bold]4. PPO through TrainerService")
        run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        t = time.monotonic()
        rows = await race(train(stack.by_name["trainer"].addr, plan, console, run_id,
                                token=trainer_token(stack.run_dir)), watcher)
        timings["training_seconds"] = time.monotonic() - t

        console.rule("[bold]5. Best-of-n after training")
        after = await ask(stack.gateway_url, plan, "policy")
        show_answer(console, f"{QUESTION!r}: best of {plan.n}, policy@v{after['adapter_version']}",
                    after)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await watcher
        await stack.stop()

    first, last = rise(rows)
    model_name = (model or default_model_dir()).name
    png = plot(rows, run_dir / "reward_kl.png",
               f"PPO on {model_name}: reward {first:.3f} -> {last:.3f}")
    timings["total_seconds"] = time.monotonic() - started
    summary = {
        "question": QUESTION, "plan": asdict(plan), "run_dir": str(run_dir), "run_id": run_id,
        "reward_model": {"path": str(rm_dir), **rm_history},
        "reward_first_quarter_mean": first, "reward_last_quarter_mean": last,
        "reward_rise": last - first,
        "kl_last": rows[-1]["kl"], "adapter_version_last": rows[-1]["adapter_version"],
        "steps": rows, "before": before, "after": after, "plot": str(png), **timings,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = summary_text(summary)
    (run_dir / "summary.txt").write_text(text + "\n")
    console.rule("[bold]Summary")
    console.print(text, highlight=False, markup=False)
    return summary


async def race(work, watcher: asyncio.Future):
    """Runs `work` unless the supervisor gives up on a service first (its error wins)."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    watcher.result()
    raise RuntimeError("the stack stopped during training")


async def until_signalled(work, console):
    """Runs `work`; the first Ctrl-C or SIGTERM cancels it (so the stack stops cleanly in its
    `finally`), later ones only say that it is stopping."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    fired = []

    def on_signal() -> None:
        if fired:
            console.print("still stopping the services ...")
            return
        fired.append(True)
        console.print("\nstopping: every service drains and exits ...")
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@click.command("demo")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="PPO steps [default: 12, or 5 with --quick].")
@click.option("--quick", is_flag=True, help="A shorter run (fewer steps).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where logs, plot and summary go [default: $RLHF_HOME/stacks/demo-<time>].")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Base model folder [default: the prepared SmolLM2-135M-Instruct].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--retrain-rm", is_flag=True, help="Train the reward model again even if cached.")
@click.option("--reward-model", "reward_model_dir", default=None,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Use this reward-model folder (`rlhf train rm` output) instead of training one.")
@click.option("--policy-replicas", type=click.IntRange(1, 4), default=1, show_default=True)
@click.option("--config", "stack_config", default=None,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Stack YAML as for `rlhf up` (per-service settings).")
def demo(steps, quick, run_dir, model, seed, retrain_rm, reward_model_dir, policy_replicas,
         stack_config) -> None:
    """The whole loop on the default model: reward model, stack, PPO with hot-reloaded
    adapters, best-of-n before and after, plot and summary."""
    from rich.console import Console

    from rlhf.paths import default_model_dir
    from rlhf.plumbing.config import ConfigError
    from rlhf.stack.plan import PlanError
    from rlhf.stack.rundir import default_run_dir
    from rlhf.stack.supervisor import ServiceFailed

    console = Console(stderr=True, soft_wrap=True)
    if model is None and not (default_model_dir() / "config.json").exists():
        console.print("Preparing the default model (once) ...")
        asyncio.run(run_step([*rlhf_command(), "model", "prepare"], Path(os.devnull), console,
                             "model prepare"))
    plan = DemoPlan.quick() if quick else DemoPlan()
    if steps is not None:
        plan.steps = steps
    plan.seed = seed
    run_dir = (run_dir or default_run_dir("demo")).resolve()
    try:
        summary = asyncio.run(until_signalled(
            run_demo(plan, run_dir, model, console, retrain_rm, policy_replicas,
                     reward_model_dir, stack_config), console))
    except asyncio.CancelledError:
        console.print("interrupted; every service was stopped")
        sys.exit(130)
    except PlanError as exc:  # a usage problem (no model folder): exit 2 with the message
        raise click.UsageError(str(exc)) from None
    except (RuntimeError, ServiceFailed, ConfigError) as exc:
        console.print(f"[red]✗ {exc}[/red] (logs in {run_dir / 'logs'}); every service was "
                      "stopped")
        sys.exit(1)
    click.echo(str(run_dir / "summary.json"))
    if summary["reward_rise"] <= 0:
        console.print("[yellow]The reward did not rise in this run.[/yellow]")
