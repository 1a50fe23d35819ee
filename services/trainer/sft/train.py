"""`rlhf train sft`: LoRA supervised fine-tuning on SFT JSONL (issue #5).

    records (jsonl.read_sft) -> token ids + loss mask per example (`encode_example`)
      -> packed into fixed-length blocks (`pack`) or one padded row each (`truncate`)
      -> next-token cross-entropy on the masked tokens only (`sft_loss`), AdamW on the LoRA weights
      -> a peft adapter folder (adapter_config.json, adapter_model.safetensors) + sft_metrics.jsonl

The adapter is the PPO starting point and what the policy service serves, so it is a plain LoRA
on the base model: no `modules_to_save`, no DoRA, rank within the policy's `max_lora_rank`.

Which tokens are trained on (the loss mask):
  prompt/response  the response and the EOS after it; the prompt is rendered as a user turn with
                   the chat template (add_generation_prompt) when the tokenizer has one, exactly
                   as the policy service renders a chat prompt, else used as plain text
  messages         the final assistant turn and its EOS; the turns before it are the prompt
  text             every token, then EOS
Prompt and response are tokenized apart, as at generation time (the policy tokenizes the prompt,
the model adds the response), so training sees the token boundary that sampling will.

From Python: `run_sft(SFTConfig(...)) -> Path`. `train_sft` is the click command (`rlhf train sft`).

Data parallel: `torchrun --nproc-per-node N -m rlhf.cli train sft ...` (gloo on CPU, NCCL with one
GPU per rank). Every rank reads the same rows in the same order; each computes its share of every
batch and gradients are summed over the ranks (services/trainer/distributed.py), so a step is the
one-process step on the whole batch. `--batch-size` stays the global batch; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from rlhf.paths import default_model_dir
from services.trainer.jsonl import DataError, SFTRecord, read_sft

METRICS_FILE = "sft_metrics.jsonl"
CONFIG_FILE = "sft_config.json"
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class SFTError(Exception):
    """A problem with the run's set-up (model folder, LoRA targets): shown without a traceback."""


@dataclass
class SFTConfig:
    """Arguments of one SFT run."""

    data: Path
    """SFT JSONL file: {"prompt","response"}, {"text"} or {"messages"} lines (DESIGN.md #9)."""
    out: Path
    """Adapter folder to write; an existing one is replaced as a whole when the run ends."""
    model: Path = field(default_factory=default_model_dir)
    """Base model folder (HF format); default: the prepared SmolLM2-135M-Instruct."""
    epochs: int = 3
    """Passes over the data."""
    lr: float = 2e-4
    """AdamW learning rate, constant; 2e-4 is the common LoRA SFT rate (QLoRA's, for 7B-13B)."""
    batch_size: int = 8
    """Rows (packed blocks, or examples with --no-packing) per optimizer step."""
    max_length: int = 512
    """Block length when packing; with no packing, longer examples are cut to this length."""
    lora_r: int = 16
    """LoRA rank; the policy service accepts up to its max_lora_rank (16 by default)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r): 2 * r, the common choice."""
    lora_dropout: float = 0.0
    """Stored in the adapter config and used again by PPO, where dropout would make recomputed
    logprobs noisy (the PPO ratio must be 1 on the first pass): so 0."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Module names that get LoRA weights: the attention projections, as vLLM serves them."""
    seed: int = 0
    """Seeds the LoRA init and the order of the batches."""
    packing: bool = True
    """Concatenate examples (each ends with EOS) into max_length blocks: no padding wasted."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (as in TRL/HF Trainer defaults)."""
    device: str = "auto"
    """"auto" = cuda when available, else cpu; or any torch device string."""
    progress: bool = True
    """Show a tqdm bar (on stderr) with the running loss."""

    def __post_init__(self) -> None:
        self.data, self.out, self.model = Path(self.data), Path(self.out), Path(self.model)
        self.target_modules = tuple(self.target_modules)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}"),
            (self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1,
             f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (bool(self.target_modules), "target_modules must name at least one module"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---------------------------------------------------------------------------------------------
# Pure functions: examples, packing, loss
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One tokenized example (or a packed block of several)."""

    input_ids: list[int]
    loss_mask: list[int]  # same length; 1 where the token is a training target


def encode_example(record: SFTRecord, tokenizer) -> Example:
    """Token ids and loss mask of one SFT record (see the module docstring for which tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SFTError("the tokenizer has no eos_token; SFT needs one to end each example")
    if record.kind == "text":
        ids = _tokenize(tokenizer, record.text, special=True) + [eos]
        return Example(ids, [1] * len(ids))
    if record.kind == "messages":
        if not _has_chat_template(tokenizer):
            raise DataError([f"{record.source}: chat messages need a tokenizer with a chat "
                             "template; this model has none"])
        prompt_ids = _chat_prompt_ids(tokenizer, list(record.messages[:-1]))
        response = record.messages[-1]["content"]
    elif _has_chat_template(tokenizer):
        prompt_ids = _chat_prompt_ids(tokenizer, [{"role": "user", "content": record.prompt}])
        response = record.response
    else:
        prompt_ids = _tokenize(tokenizer, record.prompt, special=True)
        response = record.response
    response_ids = _tokenize(tokenizer, response, special=False) + [eos]
    return Example(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def truncate(example: Example, max_length: int) -> Example:
    """The first `max_length` tokens (the prompt is kept, the end of a long response is cut)."""
    return Example(example.input_ids[:max_length], example.loss_mask[:max_length])


def pack(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Concatenate the examples (each already ends with EOS, which separates them) and cut the
    stream into blocks of `block_size` tokens; the last block holds the remainder (shorter, the
    collate step pads it). Every token appears exactly once, its mask value with it.

    Tokens of one block attend to earlier examples in the same block (no block-diagonal mask),
    as in GPT-style pre-training packing; the EOS between them marks the boundary.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ids = [t for ex in examples for t in ex.input_ids]
    mask = [m for ex in examples for m in ex.loss_mask]
    return [Example(ids[i:i + block_size], mask[i:i + block_size])
            for i in range(0, len(ids), block_size)]


def collate(rows: Sequence[Example], pad_id: int):
    """Right-pad rows to the longest: (input_ids, attention_mask, loss_mask), each [N, L] long."""
    import torch

    length = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [N, L]
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # [N, L]
    loss_mask = torch.zeros((len(rows), length), dtype=torch.long)  # [N, L]
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(row.loss_mask, dtype=torch.long)
    return input_ids, attention_mask, loss_mask


def sft_loss(logits, input_ids, loss_mask):
    """Mean next-token cross-entropy over the target tokens.

    logits [N, L, V] from the model on input_ids [N, L]; position t predicts token t + 1, so the
    target of logits[:, t] is input_ids[:, t + 1], counted where loss_mask[:, t + 1] is 1. Returns
    (loss scalar, number of target tokens).
    """
    from services.trainer.ppo_math import logprobs_from_logits, masked_mean

    logp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # [N, L-1]
    target = loss_mask[:, 1:]  # [N, L-1]
    return -masked_mean(logp, target), int(target.sum())


def _tokenize(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    # As the policy service does for a chat prompt: render to text, then tokenize without
    # special tokens (the template wrote them).
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _tokenize(tokenizer, text, special=False)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    rows: list[Example]
    truncated: int = 0  # examples cut to max_length (no packing only)
    dropped: int = 0  # examples with no target token left after the cut


def _make_rows(examples: list[Example], config: SFTConfig) -> _Rows:
    if config.packing:
        return _Rows(pack(examples, config.max_length))
    out = _Rows([])
    for ex in examples:
        if len(ex.input_ids) > config.max_length:
            out.truncated += 1
            ex = truncate(ex, config.max_length)
        # Position 0 is never a target (nothing predicts it), so count from 1.
        if sum(ex.loss_mask[1:]) == 0:
            out.dropped += 1
            continue
        out.rows.append(ex)
    return out


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise SFTError(f"{model_dir} is not a model folder (no config.json); prepare the default "
                       "model with `rlhf model prepare`, or pass --model")
    return AutoTokenizer.from_pretrained(str(model_dir))


def _check_out(out: Path) -> Path:
    """The output folder is replaced as a whole at the end: refuse anything but a new folder, an
    empty one, or an earlier adapter folder, so a typo cannot wipe a directory."""
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SFTError(f"--out {out} is a file; give a folder for the adapter")
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").is_file():
        raise SFTError(f"--out {out} is a non-empty folder that holds no adapter; the run would "
                       "replace it, so give a new or empty folder")
    return out


def _resolve_device(name: str, local_rank: int = 0):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and local_rank:
        device = torch.device("cuda", local_rank)  # one GPU per rank under torchrun
    return device


def _say(message: str) -> None:
    click.echo(message, err=True)


def run_sft(config: SFTConfig) -> Path:
    """Run SFT as configured; returns the adapter folder (config.out, resolved).

    The data is read and tokenized before the model loads, so bad data fails in seconds.
    Raises DataError (bad lines, as file:line) or SFTError (set-up) for the user's mistakes.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from rlhf.files import atomic_dir
    from services.trainer.distributed import world

    ranks = world()
    say = _say if ranks.is_main else (lambda message: None)
    out = _check_out(config.out)
    records = read_sft(config.data)
    tokenizer = _load_tokenizer(config.model)
    examples, errors = [], []
    for record in records:
        try:
            examples.append(encode_example(record, tokenizer))
        except DataError as exc:  # every line this tokenizer cannot take, not just the first
            errors.extend(exc.errors)
    if errors:
        raise DataError(errors)
    made = _make_rows(examples, config)
    if made.truncated:
        say(f"sft: {made.truncated} of {len(examples)} examples were longer than "
             f"--max-length {config.max_length} and were cut")
    if made.dropped:
        say(f"sft: {made.dropped} examples had no response token left after the cut and are "
             "not trained on")
    rows = made.rows
    if not rows:
        raise SFTError("nothing to train on: no example keeps a response token within "
                       f"--max-length {config.max_length}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id

    device = _resolve_device(config.device, ranks.local_rank)
    torch.manual_seed(config.seed)  # the LoRA A init (the same on every rank)
    model = AutoModelForCausalLM.from_pretrained(str(config.model), dtype=torch.float32)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # peft: target modules not found in the base model
        raise SFTError(f"LoRA target modules {list(config.target_modules)}: {exc}") from None
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ranks.broadcast_params(params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    order = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    say(f"sft: {len(records)} examples -> {len(rows)} row(s)"
         f"{f' of {config.max_length} tokens' if config.packing else ''}, "
         f"{steps_per_epoch} steps/epoch x {config.epochs} epochs on {device}"
         + (f" x {ranks.size} ranks" if ranks.size > 1 else ""))
    metrics: list[dict] = []
    bar = tqdm(total=steps_per_epoch * config.epochs, desc="sft", unit="step",
               disable=not (config.progress and ranks.is_main), dynamic_ncols=True)
    try:
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            loss_sum, token_sum = 0.0, 0
            perm = torch.randperm(len(rows), generator=order).tolist()
            for start in range(0, len(rows), config.batch_size):
                batch = [rows[i] for i in perm[start:start + config.batch_size]]
                if ranks.size == 1:
                    loss, n_tokens = _batch_loss(model, batch, pad_id, device)
                    if n_tokens == 0:  # a packed batch of prompt tokens only: nothing to learn
                        bar.update(1)
                        continue
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    step_loss = loss.item()
                else:
                    step_loss, n_tokens = _ranks_backward(model, batch, pad_id, device, ranks,
                                                          optimizer, params)
                    if n_tokens == 0:
                        bar.update(1)
                        continue
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                loss_sum += step_loss * n_tokens
                token_sum += n_tokens
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{step_loss:.4f}")
            epoch_loss = loss_sum / max(token_sum, 1)
            metrics.append({
                "epoch": epoch,
                "loss": epoch_loss,
                "tokens": token_sum,
                "steps": steps_per_epoch,
                "seconds": round(time.perf_counter() - started, 3),
            })
            if ranks.is_main:
                tqdm.write(f"sft: epoch {epoch}/{config.epochs} loss {epoch_loss:.4f}",
                           file=sys.stderr)
    finally:
        bar.close()

    model.eval()
    if not ranks.is_main:  # the weights are the same on every rank; rank 0 writes them
        return out
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        with open(tmp / METRICS_FILE, "w") as fh:
            for line in metrics:
                fh.write(json.dumps(line) + "\n")
        config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
        config_json["target_modules"] = list(config.target_modules)
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    return out


def _batch_loss(model, rows: Sequence[Example], pad_id: int, device):
    """(mean loss over the target tokens of `rows`, their number) from one forward pass."""
    input_ids, attention_mask, loss_mask = (t.to(device) for t in collate(rows, pad_id))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return sft_loss(logits, input_ids, loss_mask)


def _ranks_backward(model, batch: Sequence[Example], pad_id: int, device, ranks, optimizer,
                    params) -> tuple[float, int]:
    """One data-parallel backward pass over the global `batch`: this rank computes rows
    rank, rank + size, ..., weights its mean loss by its share of the batch's target tokens, and
    the gradients are summed over the ranks, giving the gradient of the whole batch's mean loss.
    Returns (that loss, the batch's target tokens); 0 tokens: nothing was computed."""
    import torch

    def targets(row: Example) -> int:
        return sum(row.loss_mask[1:])  # position 0 is never a target

    n_tokens = sum(targets(r) for r in batch)  # the same number on every rank
    if n_tokens == 0:
        return 0.0, 0
    mine = list(batch[ranks.rank::ranks.size])
    optimizer.zero_grad(set_to_none=True)
    part = torch.zeros((), dtype=torch.float64)
    local = sum(targets(r) for r in mine)
    if local:
        loss, _ = _batch_loss(model, mine, pad_id, device)
        (loss * (local / n_tokens)).backward()
        part += loss.item() * local / n_tokens
    ranks.all_reduce_grads(params)
    return float(ranks.sum_(part.to(params[0].device))), n_tokens


# ---------------------------------------------------------------------------------------------
# The command (mounted as `rlhf train sft`)
# ---------------------------------------------------------------------------------------------


def _split_modules(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(n.strip() for v in values for n in v.split(",") if n.strip())
    return names or DEFAULT_TARGET_MODULES


@click.command("sft")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: str(default_model_dir()), show_default=False,
              help="Base model folder [default: $RLHF_HOME/models/SmolLM2-135M-Instruct].")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help='SFT JSONL: {"prompt","response"}, {"text"} or {"messages"} per line.')
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Adapter folder to write (replaced when the run ends).")
@click.option("--epochs", type=click.IntRange(min=1), default=SFTConfig.epochs, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=SFTConfig.lr,
              show_default=True, help="AdamW learning rate (constant).")
@click.option("--batch-size", type=click.IntRange(min=1), default=SFTConfig.batch_size,
              show_default=True, help="Rows per optimizer step.")
@click.option("--max-length", type=click.IntRange(min=2), default=SFTConfig.max_length,
              show_default=True, help="Packed block length (or cut length with --no-packing).")
@click.option("--lora-r", type=click.IntRange(min=1), default=SFTConfig.lora_r,
              show_default=True)
@click.option("--lora-alpha", type=click.IntRange(min=1), default=SFTConfig.lora_alpha,
              show_default=True)
@click.option("--target-modules", multiple=True, callback=_split_modules,
              help="Module to adapt; repeat it or give a comma list "
                   f"[default: {','.join(DEFAULT_TARGET_MODULES)}].")
@click.option("--seed", type=int, default=SFTConfig.seed, show_default=True)
@click.option("--no-packing", is_flag=True,
              help="One padded row per example instead of packed blocks.")
def train_sft(model, data, out, epochs, lr, batch_size, max_length, lora_r, lora_alpha,
                      target_modules, seed, no_packing) -> None:
    """LoRA supervised fine-tuning; writes a peft adapter folder that PPO starts from.

    Progress goes to stderr and only the adapter folder to stdout.
    """
    config = SFTConfig(
        data=data, out=out, model=model, epochs=epochs, lr=lr, batch_size=batch_size,
        max_length=max_length, lora_r=lora_r, lora_alpha=lora_alpha,
        target_modules=target_modules, seed=seed, packing=not no_packing,
    )
    from services.trainer.distributed import process_group

    backend = "nccl" if _resolve_device(config.device).type == "cuda" else "gloo"
    with process_group(backend) as ranks:
        try:
            folder = run_sft(config)
        except (DataError, SFTError) as exc:
            raise click.ClickException(str(exc)) from None
    if ranks.is_main:
        click.echo(str(folder))
