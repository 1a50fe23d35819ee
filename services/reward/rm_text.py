"""A batch of items as a reward model's input, in the format the model was trained with
(`rlhf.formats`: `chat` or `pair`, recorded in the model folder), and how the batch is cut into
forward passes."""

from __future__ import annotations

from rlhf.formats import rm_tokenize
from services.reward.items import Item


def tokenize(tokenizer, fmt: str, items: list[Item], max_tokens: int):
    """Token ids per item, unpadded, truncated from the left."""
    return rm_tokenize(tokenizer, fmt, [it.prompt_value() for it in items],
                       [it.completion for it in items], max_tokens)


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
