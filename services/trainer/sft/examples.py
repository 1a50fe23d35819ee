"""SFT examples as token ids, pure functions (no model): which tokens are trained on (the loss
mask), packing into blocks, padding, and the loss.

Which tokens are trained on:
  prompt/response  the response and the EOS after it; the prompt is rendered as a user turn with
                   the chat template (add_generation_prompt) when the tokenizer has one, exactly
                   as the policy service renders a chat prompt, else used as plain text
  messages         the final assistant turn and its EOS; the turns before it are the prompt
  text             every token, then EOS
Prompt and response are tokenized apart, as at generation time (the policy tokenizes the prompt,
the model adds the response), so training sees the token boundary that sampling will.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.trainer.data import SFTRecord
from services.trainer.errors import DataError, TrainError


@dataclass
class Example:
    """One tokenized example (or a packed block of several)."""

    input_ids: list[int]
    loss_mask: list[int]  # same length; 1 where the token is a training target


def encode_example(record: SFTRecord, tokenizer) -> Example:
    """Token ids and loss mask of one SFT record (see the module docstring for which tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainError("the tokenizer has no eos_token; SFT needs one to end each example")
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
    from services.trainer.rl_math import logprobs_from_logits, masked_mean

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


def targets(row: Example) -> int:
    """The row's target tokens: position 0 is never one (nothing predicts it)."""
    return sum(row.loss_mask[1:])


@dataclass
class Rows:
    rows: list[Example]
    truncated: int = 0  # examples cut to max_length (no packing only)
    dropped: int = 0  # examples with no target token left after the cut


def make_rows(examples: list[Example], packing: bool, max_length: int) -> Rows:
    """Packed blocks, or one row per example cut to max_length (those left without a target
    token are dropped)."""
    if packing:
        return Rows(pack(examples, max_length))
    out = Rows([])
    for ex in examples:
        if len(ex.input_ids) > max_length:
            out.truncated += 1
            ex = truncate(ex, max_length)
        if targets(ex) == 0:
            out.dropped += 1
            continue
        out.rows.append(ex)
    return out
