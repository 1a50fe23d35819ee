"""How a (prompt, completion) pair becomes a reward model's input.

Two formats, recorded by `rlhf train rm` in the model folder's `rlhf_reward.json` so serving
reads the text exactly as training did:
- `chat`: the prompt (a chat, or a text as one user turn) plus the completion as the assistant
  turn, rendered with the tokenizer's chat template. Decoder models read the reward at the last
  token, so the completion's end must survive truncation: inputs are cut from the left.
- `pair`: the tokenizer's text-pair encoding (`[CLS] prompt [SEP] completion [SEP]` for BERT-like
  encoders), a chat prompt written as `role: content` lines.
A folder without the file gets `chat` when its tokenizer has a chat template, else `pair`.

The trainer (services/trainer/rm_train.py) keeps its own copy of these few lines (services never
import each other); tests/test_reward_train.py checks that both give the same token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.reward.items import Item

META_FILE = "rlhf_reward.json"
FORMATS = ("chat", "pair")


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def default_format(tokenizer) -> str:
    return "chat" if getattr(tokenizer, "chat_template", None) else "pair"


def chat_messages(item: Item) -> list[dict[str, str]]:
    prompt = item.message_dicts() if item.is_chat else [{"role": "user", "content": item.prompt}]
    return [*prompt, {"role": "assistant", "content": item.completion}]


def tokenize(tokenizer, fmt: str, items: list[Item], max_tokens: int):
    """Token ids per item, unpadded, truncated from the left."""
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    common = dict(truncation=True, max_length=max_tokens)
    if fmt == "chat":
        texts = [tokenizer.apply_chat_template(chat_messages(it), tokenize=False) for it in items]
        return tokenizer(texts, add_special_tokens=False, **common)
    return tokenizer([it.prompt_text() for it in items], [it.completion for it in items], **common)


def pad(tokenizer, encoded, rows: list[int] | None = None):
    """Tensors for one forward pass over `rows` of a tokenize() result, padded on the right."""
    keys = list(encoded.keys())
    picked = {k: [encoded[k][i] for i in rows] if rows is not None else encoded[k] for k in keys}
    return tokenizer.pad(picked, padding=True, return_tensors="pt")


def encode(tokenizer, fmt: str, items: list[Item], max_tokens: int):
    """Padded (right) and truncated (left) tensors for one forward pass."""
    return pad(tokenizer, tokenize(tokenizer, fmt, items, max_tokens))


def token_budget_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped for forward passes: sorted by length, each group's padded size (count x
    longest) within `budget` tokens. Padding every item to the longest of a random batch wastes
    about a third of the compute on short texts; on a CPU a few similar-length passes cost less
    than one padded one. An item longer than the budget gets a pass of its own."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending, so the newest item is the group's longest
        if current and lengths[i] * (len(current) + 1) > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups
