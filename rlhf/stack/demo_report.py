"""What `rlhf demo` shows and leaves behind: the best-of-n answers as a table, the rise of the
reward, the reward/KL plot (PNG) and the text summary."""

from __future__ import annotations

from pathlib import Path


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
