"""A DPO run: a LoRA adapter on the policy model trained on preference pairs.

    pairs (dpo.pairs.split_pairs: --data, held-out --val-file or --val-fraction)
      -> token rows per answer (encode_pairs), the prompt as the policy renders it
      -> reference log-probabilities of every answer, once, before the first step
      -> per step: the policy's log-probabilities of both answers, the DPO or IPO loss
         (rl_math.dpo_sigmoid_loss / ipo_loss), AdamW on the LoRA weights
      -> evaluation on the held-out pairs before the first step, every --eval-every steps and
         after each epoch: loss, reward accuracy and mean margin of the implicit reward
         beta * (logp - logp_ref), one line per evaluation in metrics.jsonl
      -> a peft adapter folder (adapter_config.json, adapter_model.safetensors), what the policy
         serves and `rlhf train ppo --init-adapter` starts from

The reference is the model the run starts from, with no second copy of the weights: without
--init-adapter a fresh LoRA adds nothing (its B matrices are zero), so the reference is the base
model with the adapter off; with --init-adapter (an SFT adapter) it is that adapter, as DPO asks
(the reference is the SFT policy). Both are fixed, so their log-probabilities are computed once.

The output folder is replaced as a whole when the run ends. While it runs, metrics.jsonl grows in
a hidden folder next to it (`.OUT.tmp-*`, renamed to OUT at the end) and progress goes to stderr;
the trackers (--report-to) write into OUT itself, as every stage's do, and their folders are
carried into the new OUT.

Data parallel: under torchrun every rank reads the same pairs in the same order and computes its
share of every batch (`World.backward`, weighted by pairs) and of every evaluation
(`World.gather_rows`); `batch_size` stays the global batch; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import click

from services.trainer.dpo.pairs import (
    EncodedPair,
    batch_rows,
    encode_pairs,
    sequence_logprobs,
    split_pairs,
)
from services.trainer.dpo.settings import DPOSettings
from services.trainer.errors import TrainError
from services.trainer.sft.train import _check_out, _load_tokenizer
from services.trainer.tracking import TRACKING_DIRS

METRICS_FILE = "metrics.jsonl"
SETTINGS_FILE = "dpo_config.json"
SECRET_FIELDS = {"admin_token"}


def _say(message: str) -> None:
    click.echo(message, err=True)


def preference_loss(settings: DPOSettings) -> Callable:
    """loss(logp_c, logp_r, ref_c, ref_r) of the run's --loss."""
    from services.trainer.rl_math import dpo_sigmoid_loss, ipo_loss

    s = settings
    if s.loss == "ipo":
        return lambda lc, lr, rc, rr: ipo_loss(lc, lr, rc, rr, s.beta)
    return lambda lc, lr, rc, rr: dpo_sigmoid_loss(lc, lr, rc, rr, s.beta, s.label_smoothing)


def pair_figures(settings: DPOSettings, logp, ref) -> dict[str, float]:
    """Loss and implicit-reward figures of pairs: logp, ref [N, 2] (chosen, rejected)."""
    import torch

    from services.trainer.rl_math import dpo_implicit_rewards

    r_c = dpo_implicit_rewards(logp[:, 0], ref[:, 0], settings.beta)
    r_r = dpo_implicit_rewards(logp[:, 1], ref[:, 1], settings.beta)
    loss = preference_loss(settings)(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1])
    return {"loss": float(loss), "accuracy": float((r_c > r_r).to(torch.float32).mean()),
            "margin": float((r_c - r_r).mean()), "chosen_reward": float(r_c.mean()),
            "rejected_reward": float(r_r.mean())}


def build_model(settings: DPOSettings):
    """The base model with the run's trainable LoRA (fresh, or --init-adapter's)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    s = settings
    torch.manual_seed(s.seed)  # the LoRA A init (the same on every rank)
    model = AutoModelForCausalLM.from_pretrained(str(s.model), dtype=torch.float32)
    if s.init_adapter is not None:
        if not (Path(s.init_adapter) / "adapter_config.json").is_file():
            raise TrainError(f"--init-adapter {s.init_adapter} is not an adapter folder (no "
                             "adapter_config.json)")
        try:
            return PeftModel.from_pretrained(model, str(s.init_adapter), is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as exc:  # another base's adapter, say
            raise TrainError(f"--init-adapter {s.init_adapter} does not load on {s.model}: "
                             f"{str(exc).splitlines()[0]}") from None
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=list(s.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # peft: target modules not found in the base model
        raise TrainError(f"LoRA target modules {list(s.target_modules)}: {exc}") from None


def run_dpo(settings: DPOSettings) -> Path:
    """Run DPO as set; returns the adapter folder (settings.out, resolved).

    The data is read and tokenized before the model loads, so bad data fails in seconds.
    Raises DataError (bad lines, as file:line) or TrainError (set-up) for the user's mistakes,
    ConfigError for a device this machine lacks.
    """
    from rlhf.files import atomic_dir
    from services.trainer.distributed import world

    s = settings
    ranks = world()
    say = _say if ranks.is_main else (lambda message: None)
    out = _check_out(s.out)
    train_pairs, val_pairs = split_pairs(s.data, s.val_file, s.val_fraction, s.seed)
    tokenizer = _load_tokenizer(s.model)
    train = encode_pairs(train_pairs, tokenizer, s.max_length)
    val = encode_pairs(val_pairs, tokenizer, s.max_length)
    for name, enc in (("training", train), ("held-out", val)):
        if enc.truncated:
            say(f"dpo: {enc.truncated} {name} answers were longer than --max-length "
                f"{s.max_length} and were cut")
        if enc.dropped:
            say(f"dpo: {enc.dropped} {name} pairs had an answer with no token left within "
                f"--max-length {s.max_length} and are left out")
    if not train.pairs:
        raise TrainError(f"nothing to train on: no pair keeps a token of both answers within "
                         f"--max-length {s.max_length}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    run = _Run(s, ranks, say, build_model(s), train.pairs, val.pairs, pad_id)
    if not ranks.is_main:  # the weights are the same on every rank; rank 0 writes them
        run.train(None)
        return out
    with atomic_dir(out) as tmp:
        say(f"dpo: metrics go to {tmp / METRICS_FILE} until the run ends, then to {out}")
        run.train(tmp)
        run.model.save_pretrained(str(tmp))
        (tmp / SETTINGS_FILE).write_text(
            s.model_dump_json(indent=2, exclude=SECRET_FIELDS) + "\n")
        for name in TRACKING_DIRS:
            if (out / name).is_dir():
                shutil.copytree(out / name, tmp / name, symlinks=True)
    return out


class _Run:
    """The state of one run: model, optimizer, encoded pairs and their reference logprobs."""

    def __init__(self, settings: DPOSettings, ranks, say, model, train: list[EncodedPair],
                 val: list[EncodedPair], pad_id: int):
        import torch

        from services.trainer.distributed import resolve_device

        self.s, self.ranks, self.say = settings, ranks, say
        self.train_pairs, self.val_pairs, self.pad_id = train, val, pad_id
        self.device = resolve_device(settings.device, ranks)
        self.model = model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        ranks.broadcast_params(self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)
        self.loss_fn = preference_loss(settings)

    # ------------------------------------------------------------------ forward passes

    def _logps(self, pairs: list[EncodedPair]):
        """[N, 2]: the model's sequence logprobs of (chosen, rejected) of each pair."""
        input_ids, attention_mask, loss_mask = (
            t.to(self.device) for t in batch_rows(pairs, self.pad_id))
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        logp = sequence_logprobs(logits, input_ids, loss_mask)  # [2N]
        return logp.view(2, len(pairs)).T

    def logps_of(self, pairs: list[EncodedPair]):
        """[N, 2] for every pair, without gradients, each rank computing its share."""
        import torch

        mine = self.ranks.shard(len(pairs))
        was_training = self.model.training
        self.model.eval()
        parts = []
        with torch.no_grad():
            for k in range(0, len(mine), self.s.batch_size):
                parts.append(self._logps([pairs[i] for i in mine[k:k + self.s.batch_size]]))
        self.model.train(was_training)
        local = torch.cat(parts) if parts else torch.zeros((0, 2), device=self.device)
        return self.ranks.gather_rows(local, mine, len(pairs))

    # ------------------------------------------------------------------ the loop

    def train(self, folder: Path | None) -> None:
        """Trains for --epochs; on rank 0 `folder` receives metrics.jsonl (and the tracker's
        files)."""
        import torch
        from tqdm import tqdm

        s, ranks = self.s, self.ranks
        # The model before any step is the reference (see the module docstring).
        ref_all = self.logps_of(self.train_pairs + self.val_pairs)
        ref_train, ref_val = ref_all[:len(self.train_pairs)], ref_all[len(self.train_pairs):]
        steps_per_epoch = math.ceil(len(self.train_pairs) / s.batch_size)
        self.say(f"dpo ({s.loss}, beta {s.beta}): {len(self.train_pairs)} training / "
                 f"{len(self.val_pairs)} held-out pairs, {steps_per_epoch} steps/epoch x "
                 f"{s.epochs} epochs on {self.device}"
                 + (f" x {ranks.size} ranks" if ranks.size > 1 else ""))
        log = _MetricsLog(folder, s) if folder is not None else None
        running = dict.fromkeys(("loss", "accuracy", "margin", "pairs"), 0.0)

        def evaluate(step: int, epoch: float) -> None:
            line: dict = {"step": step, "epoch": round(epoch, 4)}
            if running["pairs"]:
                n = running["pairs"]
                line.update({f"train/{k}": running[k] / n for k in ("loss", "accuracy",
                                                                     "margin")})
                running.update(dict.fromkeys(running, 0.0))
            if self.val_pairs:
                figures = pair_figures(s, self.logps_of(self.val_pairs), ref_val)
                line.update({f"val/{k}": v for k, v in figures.items()})
            if log is not None and len(line) > 2:
                log.write(line)
                bar.write("dpo: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                              f"{k} {v}" for k, v in line.items()),
                          file=sys.stderr)

        def step_fn(batch: list[int], rows: list[int], scale: float) -> dict[str, float]:
            idx = [batch[i] for i in rows]
            logp = self._logps([self.train_pairs[i] for i in idx])
            ref = ref_train[idx]
            loss = self.loss_fn(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1])
            (loss * scale).backward()
            with torch.no_grad():
                figures = pair_figures(s, logp.detach(), ref)
            return {"loss": float(loss.detach()), "accuracy": figures["accuracy"],
                    "margin": figures["margin"]}

        order = torch.Generator().manual_seed(s.seed)
        bar = tqdm(total=steps_per_epoch * s.epochs, desc="dpo", unit="step",
                   disable=not (s.progress and ranks.is_main), dynamic_ncols=True)
        step = 0
        self.model.train()
        try:
            with (log or nullcontext()):
                evaluate(0, 0.0)
                for epoch in range(s.epochs):
                    perm = torch.randperm(len(self.train_pairs), generator=order).tolist()
                    for start in range(0, len(perm), s.batch_size):
                        batch = perm[start:start + s.batch_size]
                        self.optimizer.zero_grad(set_to_none=True)
                        _, figures = ranks.backward(
                            self.params, len(batch), len,
                            lambda rows, scale, b=batch: step_fn(b, rows, scale),
                            ("loss", "accuracy", "margin"))
                        torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
                        self.optimizer.step()
                        step += 1
                        for k in ("loss", "accuracy", "margin"):
                            running[k] += figures[k] * len(batch)
                        running["pairs"] += len(batch)
                        bar.update(1)
                        bar.set_postfix(loss=f"{figures['loss']:.4f}",
                                        margin=f"{figures['margin']:.3f}")
                        end_of_epoch = start + s.batch_size >= len(perm)
                        if end_of_epoch or (s.eval_every and step % s.eval_every == 0):
                            evaluate(step, epoch + min(1.0, (start + len(batch)) / len(perm)))
        finally:
            bar.close()
        self.model.eval()


class _MetricsLog:
    """metrics.jsonl, one line per evaluation, and the same figures to the run's tracker."""

    def __init__(self, folder: Path, settings: DPOSettings):
        self.path = folder / METRICS_FILE
        self.settings = settings
        self.tracker = None

    def __enter__(self):
        from services.trainer.tracking import open_tracker, settings_config

        s = self.settings
        self.tracker = open_tracker(s.report_to, Path(s.out).expanduser().resolve(),
                                    settings_config(s))
        return self

    def write(self, line: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.tracker.log({k: v for k, v in line.items() if k != "step"}, line["step"])

    def __exit__(self, *exc) -> bool:
        self.tracker.close()
        return False
