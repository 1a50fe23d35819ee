"""An SFT run: LoRA supervised fine-tuning on SFT JSONL.

    records (data.read_sft) -> token ids + loss mask per example (examples.encode_example)
      -> packed into fixed-length blocks (pack) or one padded row each (truncate)
      -> next-token cross-entropy on the masked tokens only (sft_loss), AdamW on the LoRA weights
      -> a peft adapter folder (adapter_config.json, adapter_model.safetensors) + sft_metrics.jsonl

The adapter is the PPO starting point and what the policy service serves, so it is a plain LoRA
on the base model: no `modules_to_save`, no DoRA, rank within the policy's `max_lora_rank`.

Data parallel: under torchrun every rank reads the same rows in the same order; each computes its
share of every batch (`World.backward`, weighted by target tokens), so a step is the one-process
step on the whole batch. `batch_size` stays the global batch; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import click

from services.trainer.data import read_sft
from services.trainer.errors import DataError, TrainError
from services.trainer.sft.examples import collate, encode_example, make_rows, sft_loss, targets
from services.trainer.sft.settings import SFTSettings
from services.trainer.tracking import TRACKING_DIRS, open_tracker, settings_config

METRICS_FILE = "sft_metrics.jsonl"
SETTINGS_FILE = "sft_config.json"


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise TrainError(f"{model_dir} is not a model folder (no config.json); prepare the "
                         "default model with `rlhf model prepare`, or pass --model")
    return AutoTokenizer.from_pretrained(str(model_dir))


def _check_out(out: Path) -> Path:
    """The output folder is replaced as a whole at the end: refuse anything but a new folder, an
    empty one, or an earlier adapter folder, so a typo cannot wipe a directory."""
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a folder for the adapter")
    # Tracking folders of an earlier, unfinished run are kept (and carried over at the end).
    held = [p for p in out.iterdir() if p.name not in TRACKING_DIRS] if out.is_dir() else []
    if held and not (out / "adapter_config.json").is_file():
        raise TrainError(f"--out {out} is a non-empty folder that holds no adapter; the run "
                         "would replace it, so give a new or empty folder")
    return out


def resolve_device(name: str, local_rank: int = 0):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and local_rank:
        device = torch.device("cuda", local_rank)  # one GPU per rank under torchrun
    return device


def _say(message: str) -> None:
    click.echo(message, err=True)


def run_sft(settings: SFTSettings) -> Path:
    """Run SFT as set; returns the adapter folder (settings.out, resolved).

    The data is read and tokenized before the model loads, so bad data fails in seconds.
    Raises DataError (bad lines, as file:line) or TrainError (set-up) for the user's mistakes.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from rlhf.files import atomic_dir
    from services.trainer.distributed import world

    s = settings
    ranks = world()
    say = _say if ranks.is_main else (lambda message: None)
    out = _check_out(s.out)
    records = read_sft(s.data)
    tokenizer = _load_tokenizer(s.model)
    examples, errors = [], []
    for record in records:
        try:
            examples.append(encode_example(record, tokenizer))
        except DataError as exc:  # every line this tokenizer cannot take, not just the first
            errors.extend(exc.errors)
    if errors:
        raise DataError(errors)
    made = make_rows(examples, s.packing, s.max_length)
    if made.truncated:
        say(f"sft: {made.truncated} of {len(examples)} examples were longer than "
            f"--max-length {s.max_length} and were cut")
    if made.dropped:
        say(f"sft: {made.dropped} examples had no response token left after the cut and are "
            "not trained on")
    rows = made.rows
    if not rows:
        raise TrainError("nothing to train on: no example keeps a response token within "
                         f"--max-length {s.max_length}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id

    device = resolve_device(s.device, ranks.local_rank)
    torch.manual_seed(s.seed)  # the LoRA A init (the same on every rank)
    model = AutoModelForCausalLM.from_pretrained(str(s.model), dtype=torch.float32)
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=list(s.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # peft: target modules not found in the base model
        raise TrainError(f"LoRA target modules {list(s.target_modules)}: {exc}") from None
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ranks.broadcast_params(params)
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)

    def step(batch, rows_: list[int], scale: float) -> dict[str, float]:
        input_ids, attention_mask, loss_mask = (t.to(device) for t in
                                                collate([batch[i] for i in rows_], pad_id))
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss, _ = sft_loss(logits, input_ids, loss_mask)
        (loss * scale).backward()
        return {"loss": loss.item()}

    order = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = math.ceil(len(rows) / s.batch_size)
    say(f"sft: {len(records)} examples -> {len(rows)} row(s)"
        f"{f' of {s.max_length} tokens' if s.packing else ''}, "
        f"{steps_per_epoch} steps/epoch x {s.epochs} epochs on {device}"
        + (f" x {ranks.size} ranks" if ranks.size > 1 else ""))
    metrics: list[dict] = []
    # Rank 0 reports, into OUT itself; the trackers' folders move into the new OUT at the end.
    tracker = open_tracker(s.report_to if ranks.is_main else "none", out, settings_config(s))
    bar = tqdm(total=steps_per_epoch * s.epochs, desc="sft", unit="step",
               disable=not (s.progress and ranks.is_main), dynamic_ncols=True)
    try:
        for epoch in range(1, s.epochs + 1):
            started = time.perf_counter()
            loss_sum, token_sum = 0.0, 0
            perm = torch.randperm(len(rows), generator=order).tolist()
            for start in range(0, len(rows), s.batch_size):
                batch = [rows[i] for i in perm[start:start + s.batch_size]]
                optimizer.zero_grad(set_to_none=True)
                n_tokens, figures = ranks.backward(
                    params, len(batch), lambda pos, b=batch: sum(targets(b[i]) for i in pos),
                    lambda pos, scale, b=batch: step(b, pos, scale), ("loss",))
                bar.update(1)
                if n_tokens == 0:  # a packed batch of prompt tokens only: nothing to learn
                    continue
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                loss_sum += figures["loss"] * n_tokens
                token_sum += int(n_tokens)
                bar.set_postfix(epoch=epoch, loss=f"{figures['loss']:.4f}")
            epoch_loss = loss_sum / max(token_sum, 1)
            metrics.append({"epoch": epoch, "loss": epoch_loss, "tokens": token_sum,
                            "steps": steps_per_epoch,
                            "seconds": round(time.perf_counter() - started, 3)})
            tracker.log(metrics[-1], epoch)
            if ranks.is_main:
                tqdm.write(f"sft: epoch {epoch}/{s.epochs} loss {epoch_loss:.4f}",
                           file=sys.stderr)
    finally:
        bar.close()
        tracker.close()

    model.eval()
    if not ranks.is_main:  # the weights are the same on every rank; rank 0 writes them
        return out
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in metrics))
        (tmp / SETTINGS_FILE).write_text(s.model_dump_json(indent=2) + "\n")
        for name in TRACKING_DIRS:
            if (out / name).is_dir():
                shutil.copytree(out / name, tmp / name, symlinks=True)
    return out
