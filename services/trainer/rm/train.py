"""A reward-model run: a reward model from preference or ratings JSONL.

- Preference data: one scalar output, trained with the pairwise Bradley-Terry loss
  -log sigmoid(r_chosen - r_rejected) (InstructGPT, StackLLaMA).
- Ratings data: K outputs, one per rating bin, trained with cross-entropy on the rating's bin;
  the reward is the expected rating (PaLM-rlhf's `num_binned_output`).
The new head is always trained in full; the backbone gets LoRA (default), stays frozen, or is
trained in full (rm/model.py).

With --init-from the run starts from an earlier reward model's weights and head (a warm start,
as the feedback loop retrains the active model on new pairs).

The output folder is what `rm:PATH` serves: a peft adapter over the backbone (LoRA) or a full
model, its tokenizer, and `rlhf_reward.json` (input format, bins). Checkpoints go to
OUT/checkpoint and a second run resumes from the last one (more --epochs continue training).

Data parallel: under torchrun every rank sees the same batches; each computes its share of every
batch (`World.backward`, weighted by items), so a step is the one-process step on the whole
batch. `batch_size` stays the global batch; rank 0 alone evaluates, writes checkpoints, metrics
and the model.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from pathlib import Path

import click

from rlhf.files import atomic_write
from rlhf.formats import RM_META_FILE, rm_default_format, rm_read_meta
from services.trainer.data import Pair
from services.trainer.errors import TrainError
from services.trainer.rl_math import bt_loss, concordance, expected_rating, pairwise_accuracy
from services.trainer.rm.data import bin_index, rating_bins, split
from services.trainer.rm.model import (
    MODEL_FILES,
    build_model,
    display_name,
    encode,
    has_model,
    is_head,
    resolve_backbone,
    warm_backbone,
    warm_labels,
)
from services.trainer.rm.settings import RMSettings
from services.trainer.tracking import open_tracker, settings_config

CHECKPOINT = "checkpoint"


class RewardTrainer:
    def __init__(self, settings: RMSettings, echo=click.echo):
        from services.trainer.distributed import world

        self.s = settings
        self.ranks = world()
        self.echo = echo if self.ranks.is_main else (lambda *args, **kwargs: None)

    def _warn(self, message: str) -> None:
        self.echo(message, err=True)

    def _build(self, backbone: Path, num_labels: int) -> None:
        import torch

        s = self.s
        if s.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = s.device
        if self.device == "cuda" and self.ranks.size > 1:
            self.device = f"cuda:{self.ranks.local_rank}"  # one GPU per rank under torchrun
        model, tokenizer, head = build_model(s, backbone, num_labels)
        self.model, self.tokenizer, self.head = model.to(self.device), tokenizer, head
        self.format = (rm_read_meta(s.init_from).get("format") if s.init_from is not None
                       else None) or rm_default_format(tokenizer)
        self.bins_t = None if self.bins is None else torch.tensor(self.bins, device=self.device)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head_lr = s.head_lr if s.head_lr is not None else s.lr
        groups = [
            {"params": [p for n, p in trainable if not is_head(n, head)], "lr": s.lr},
            {"params": [p for n, p in trainable if is_head(n, head)], "lr": head_lr},
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
        self.params = [p for _, p in trainable]

    def _initial_state(self, ckpt_dir: Path, fingerprint: dict) -> dict:
        s = self.s
        if s.restart and ckpt_dir.exists() and self.ranks.is_main:
            for f in ckpt_dir.iterdir():
                f.unlink()
        self.ranks.barrier()  # every rank sees the same checkpoint (or none)
        if (ckpt_dir / "state.pt").exists():
            state = self._resume(ckpt_dir, fingerprint)
        else:
            if self.ranks.is_main:
                (s.out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run, a fresh log
            state = {"epoch": 0, "step": 0, "global_step": 0, "history": []}
        self.ranks.broadcast_params(self.params)
        return state

    def run(self) -> list[dict]:
        """Trains (or resumes) to --epochs and saves the model; returns the epoch history."""
        s = self.s
        backbone = (warm_backbone(s.init_from) if s.init_from is not None
                     else resolve_backbone(s.model))
        train, val = split(s, self._warn)
        self.preference = isinstance(train[0], Pair)
        if self.preference and s.bins is not None:
            raise TrainError("--bins is for ratings data; preference data trains one output")
        self.bins = None if self.preference else rating_bins([x.rating for x in train], s.bins)
        num_labels = 1 if self.preference else len(self.bins)
        if s.init_from is not None and warm_labels(s.init_from) != num_labels:
            raise TrainError(f"--init-from {s.init_from} has {warm_labels(s.init_from)} "
                             f"output(s); this data trains {num_labels}")
        self._build(backbone, num_labels)

        ckpt_dir = s.out / CHECKPOINT
        fingerprint = s.fingerprint(backbone)
        state = self._initial_state(ckpt_dir, fingerprint)
        steps_per_epoch = math.ceil(len(train) / s.batch_size)
        kind = "preference pairs" if self.preference else f"ratings ({num_labels} bins)"
        start = (f"warm start from {s.init_from}" if s.init_from is not None
                 else display_name(s.model, backbone))
        self.echo(f"reward model: {start} ({s.backbone}), "
                  f"{len(train)} training / {len(val)} validation {kind}, {s.epochs} epoch(s) x "
                  f"{steps_per_epoch} steps, on {self.device}")
        if state["epoch"] >= s.epochs and has_model(s.out):
            self.echo(f"already trained for {state['epoch']} epoch(s) in {s.out}; nothing to do "
                      "(raise --epochs to continue, or --restart)")
            return state["history"]

        # Rank 0 alone reports; a resumed run's figures continue from its next epoch.
        with open_tracker(s.report_to if self.ranks.is_main else "none", s.out,
                          settings_config(s), start_step=state["epoch"] + 1) as tracker:
            while state["epoch"] < s.epochs:
                epoch = state["epoch"]
                done = self._train_epoch(train, epoch, steps_per_epoch, state, ckpt_dir,
                                         fingerprint)
                if not done:  # --max-steps reached mid-epoch: checkpoint saved, stop here
                    self.echo(f"stopped after {state['global_step']} steps (--max-steps); "
                              "run again to resume")
                    return state["history"]
                evaluated = self.evaluate(val) if self.ranks.is_main else {}
                record = {"epoch": epoch + 1, **state.pop("epoch_stats"), **evaluated}
                state["history"].append(record)
                state.update(epoch=epoch + 1, step=0)
                self._save_checkpoint(ckpt_dir, fingerprint, state)
                self.echo(_describe(record))
                if self.ranks.is_main:
                    with (s.out / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps(record) + "\n")
                tracker.log(record, record["epoch"])
            if self.ranks.is_main:
                self._save_model(backbone, state["history"])
        self.echo(f"saved reward model to {s.out} (serve it with --scorer rm:{s.out})")
        return state["history"]

    def _batches(self, data: list, epoch: int) -> list[list]:
        order = list(range(len(data)))
        random.Random(self.s.seed * 1_000_003 + epoch).shuffle(order)
        bs = self.s.batch_size
        return [[data[i] for i in order[k : k + bs]] for k in range(0, len(order), bs)]

    def _forward(self, prompts, responses):
        batch = encode(self.tokenizer, self.format, prompts, responses, self.s.max_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.model(**batch).logits.float()

    def _loss(self, batch):
        """(loss, correct count, rewards) for one batch; rewards are (r_chosen, r_rejected) for
        pairs and the expected ratings for rated responses."""
        import torch
        import torch.nn.functional as F

        if self.preference:
            n = len(batch)
            logits = self._forward([p.prompt for p in batch] * 2,
                                   [p.chosen for p in batch] + [p.rejected for p in batch])
            rc, rr = logits[:n, 0], logits[n:, 0]
            return bt_loss(rc, rr), float((rc > rr).sum()), (rc, rr)
        logits = self._forward([x.prompt for x in batch], [x.response for x in batch])
        target = torch.tensor([bin_index(x.rating, self.bins) for x in batch], device=self.device)
        correct = float((logits.argmax(-1) == target).sum())
        return F.cross_entropy(logits, target), correct, expected_rating(logits, self.bins_t)

    def _train_epoch(self, train, epoch, steps_per_epoch, state, ckpt_dir, fingerprint) -> bool:
        import torch

        s = self.s
        batches = self._batches(train, epoch)
        stats = state.setdefault("running", {"loss": 0.0, "correct": 0.0, "n": 0, "steps": 0})
        self.model.train()
        with _progress(s.progress and self.ranks.is_main, f"epoch {epoch + 1}/{s.epochs}",
                       steps_per_epoch, state["step"]) as advance:
            for step in range(state["step"], len(batches)):
                if s.max_steps is not None and state["global_step"] >= s.max_steps:
                    self._save_checkpoint(ckpt_dir, fingerprint, state)
                    return False
                batch = batches[step]
                self.optimizer.zero_grad(set_to_none=True)
                _, figures = self.ranks.backward(
                    self.params, len(batch), len,
                    lambda pos, scale, b=batch: self._step([b[i] for i in pos], scale),
                    ("loss", "accuracy"))
                loss, correct = figures["loss"], round(figures["accuracy"] * len(batch))
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
                stats["loss"] += loss * len(batch)
                stats["correct"] += correct
                stats["n"] += len(batch)
                stats["steps"] += 1
                state["step"] = step + 1
                state["global_step"] += 1
                advance(loss)
                if s.checkpoint_every and state["global_step"] % s.checkpoint_every == 0:
                    self._save_checkpoint(ckpt_dir, fingerprint, state)
        running = state.pop("running")
        n = max(running["n"], 1)
        acc_name = "train_accuracy" if self.preference else "train_bin_accuracy"
        state["epoch_stats"] = {"train_loss": running["loss"] / n, acc_name: running["correct"] / n}
        return True

    def _step(self, rows: list, scale: float) -> dict[str, float]:
        """Backward pass of the mean loss of `rows` times `scale`; its loss and accuracy."""
        loss, correct, _ = self._loss(rows)
        (loss * scale).backward()
        return {"loss": float(loss.detach()), "accuracy": correct / len(rows)}

    def evaluate(self, val: list) -> dict:
        """Validation loss and pairwise accuracy (for ratings: concordance of the expected
        rating over pairs of items with different ratings, plus bin accuracy)."""
        import torch

        if not val:
            return {}
        self.model.eval()
        loss_sum, correct, outputs = 0.0, 0.0, []
        with torch.inference_mode():
            for k in range(0, len(val), self.s.batch_size):
                batch = val[k : k + self.s.batch_size]
                loss, c, rewards = self._loss(batch)
                loss_sum += float(loss) * len(batch)
                correct += c
                outputs.append(rewards)
        self.model.train()
        out = {"val_loss": loss_sum / len(val)}
        if self.preference:
            rc = torch.cat([r[0] for r in outputs])
            rr = torch.cat([r[1] for r in outputs])
            out["val_accuracy"] = pairwise_accuracy(rc, rr)
        else:
            ratings = torch.tensor([x.rating for x in val])
            out["val_accuracy"] = concordance(torch.cat(outputs).cpu(), ratings)
            out["val_bin_accuracy"] = correct / len(val)
        return out

    # checkpoints
    def _trainable_state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()
                if p.requires_grad}

    def _save_checkpoint(self, ckpt_dir: Path, fingerprint: dict, state: dict) -> None:
        import torch

        if not self.ranks.is_main:  # the same weights and optimizer on every rank
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": fingerprint, "state": state,
                   "trainable": self._trainable_state(),
                   "optimizer": self.optimizer.state_dict(), "saved": time.time()}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write(ckpt_dir / "state.pt", buffer.getvalue())  # a crash keeps the last one

    def _resume(self, ckpt_dir: Path, fingerprint: dict) -> dict:
        import torch

        payload = torch.load(ckpt_dir / "state.pt", map_location=self.device, weights_only=True)
        old = payload["fingerprint"]
        differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if differ:
            raise TrainError(
                f"{ckpt_dir} was made with different settings ({', '.join(differ)}); "
                "use --restart to start over, or another --out"
            )
        trainable = payload["trainable"]
        own = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(trainable) != own:
            raise TrainError(f"{ckpt_dir}: checkpoint parameters do not match the model")
        missing = self.model.load_state_dict(trainable, strict=False)
        if missing.unexpected_keys:
            raise TrainError(f"{ckpt_dir}: unexpected parameters {missing.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(payload["optimizer"])
        state = payload["state"]
        self.echo(f"resuming from {ckpt_dir}: epoch {state['epoch'] + 1}, step {state['step']}")
        return state

    def _save_model(self, backbone: Path, history: list[dict]) -> None:
        s = self.s
        out = s.out
        for name in MODEL_FILES:  # a stale file of the other kind would shadow the new model
            (out / name).unlink(missing_ok=True)
        model = self.model.cpu().eval()
        if s.backbone == "lora" and s.merge:
            model = model.merge_and_unload()
        model.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        meta = {
            "format": self.format, "num_labels": 1 if self.bins is None else len(self.bins),
            "bins": self.bins, "max_tokens": s.max_length, "backbone": str(backbone),
            "data": "preference" if self.preference else "ratings",
            "adapter": s.backbone == "lora" and not s.merge, "history": history,
            "init_from": str(s.init_from) if s.init_from is not None else None,
        }
        (out / RM_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _describe(record: dict) -> str:
    figures = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items() if k != "epoch")
    return f"epoch {record['epoch']}: {figures}"


class _progress:
    """A rich progress bar over one epoch's steps (nothing when disabled); yields advance(loss)."""

    def __init__(self, enabled: bool, label: str, total: int, done: int):
        self.enabled, self.label, self.total, self.done = enabled, label, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total, completed=self.done, loss="-")
        return lambda loss: self.bar.update(task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
