"""DPO data as token ids, pure functions (no model): preference pairs read, split and encoded, the
rows of a batch, and the sequence log-probabilities of the answers.

Each answer is encoded as the SFT stage encodes a prompt/response example (sft.examples): the
prompt rendered as a user turn with the chat template when the tokenizer has one (as the policy
renders a chat prompt), the answer tokenized apart, then EOS; the answer and its EOS are the
tokens whose log-probabilities count.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.trainer.data import Pair, Rated, SFTRecord, read_rm
from services.trainer.errors import DataError, TrainError
from services.trainer.sft.examples import Example, collate, encode_example, targets, truncate


@dataclass
class EncodedPair:
    """One pair as two token rows sharing the prompt."""

    chosen: Example
    rejected: Example


def read_pairs(path: Path) -> list[Pair]:
    """The preference pairs of a file; DataError for bad lines, an empty file or rating lines."""
    records = read_rm(path)
    if isinstance(records[0], Rated):
        raise DataError([f"{path}: holds rating lines (prompt, response, rating); DPO trains on "
                         "preference lines (prompt, chosen, rejected). Train a reward model on "
                         "ratings with `rlhf train rm`."])
    return records


def split_pairs(data: Path, val_file: Path | None, val_fraction: float,
                seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out) pairs: --val-file, or a seeded --val-fraction of --data."""
    pairs = read_pairs(data)
    if val_file is not None:
        return pairs, read_pairs(val_file)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    train = [pairs[i] for i in order[n_val:]]
    if not train:
        raise TrainError(f"{data}: no training pairs left after holding out --val-fraction "
                         f"{val_fraction} of {len(pairs)}")
    return train, [pairs[i] for i in order[:n_val]]


@dataclass
class Encoded:
    pairs: list[EncodedPair]
    truncated: int = 0  # answers cut to max_length
    dropped: int = 0  # pairs with an answer that has no token left within max_length


def encode_pairs(pairs: Sequence[Pair], tokenizer, max_length: int) -> Encoded:
    """Both answers of every pair as token rows of at most `max_length` tokens."""
    out = Encoded([])
    for pair in pairs:
        rows = []
        for answer in (pair.chosen, pair.rejected):
            ex = encode_example(SFTRecord("", prompt=pair.prompt, response=answer), tokenizer)
            if len(ex.input_ids) > max_length:
                out.truncated += 1
                ex = truncate(ex, max_length)
            rows.append(ex)
        if any(targets(r) == 0 for r in rows):
            out.dropped += 1
            continue
        out.pairs.append(EncodedPair(*rows))
    return out


def batch_rows(pairs: Sequence[EncodedPair], pad_id: int):
    """One padded batch of 2N rows, the N chosen answers then the N rejected ones:
    (input_ids, attention_mask, loss_mask), each [2N, L]."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def sequence_logprobs(logits, input_ids, loss_mask):
    """Sum of log pi(token) over each row's answer tokens: logits [N, L, V] from the model on
    input_ids [N, L] -> [N]. Position t predicts token t + 1 (as in sft_loss)."""
    from services.trainer.rl_math import logprobs_from_logits

    logp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # [N, L-1]
    return (logp * loss_mask[:, 1:].to(logp.dtype)).sum(-1)
