"""`rlhf train rm --init-from`: a reward model continues from an earlier one's weights and head
(a full model folder or a LoRA adapter over its base), which is how the loop retrains the active
version; a folder that is no reward model, or one with another number of outputs, is refused."""

from __future__ import annotations

import json

import pytest

from services.trainer.loop.evaluate import PairScorer
from tests.fixtures.reward_helpers import synthetic_ratings, train_rm, write_jsonl

pytestmark = pytest.mark.slow


def scores(folder, pairs):
    scorer = PairScorer(folder)
    return scorer.rewards([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]).tolist()


@pytest.fixture(scope="module")
def lora_rm(tiny_model_dir, synthetic_data, tmp_path_factory):
    train, val = synthetic_data
    out = tmp_path_factory.mktemp("warm") / "lora-rm"
    train_rm(train, out, "--model", str(tiny_model_dir), "--val-file", str(val),
             "--backbone", "lora", "--lora-r", "4", "--epochs", "1", "--batch-size", "16",
             "--lr", "1e-3", "--max-length", "64")
    return out


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_warm_start_begins_where_the_earlier_model_ended(kind, tiny_rm, lora_rm,
                                                           tiny_model_dir, tmp_path):
    init = tiny_rm.path if kind == "full" else lora_rm
    val = [json.loads(line) for line in tiny_rm.val.read_text().splitlines()][:16]
    # A learning rate too small to move the weights: the result scores as the earlier model.
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    train_rm(tiny_rm.train, warm, "--init-from", str(init), "--backbone", kind, "--epochs", "1",
             "--lr", "1e-12", "--max-length", "64", "--val-file", str(tiny_rm.val))
    assert scores(warm, val) == pytest.approx(scores(init, val), abs=1e-4)
    meta = json.loads((warm / "rlhf_reward.json").read_text())
    assert meta["init_from"] == str(init)
    # Without it the same run starts from a new head: other scores.
    train_rm(tiny_rm.train, cold, "--model", str(tiny_model_dir), "--backbone", kind,
             "--epochs", "1", "--lr", "1e-12", "--max-length", "64", "--val-file",
             str(tiny_rm.val))
    assert scores(cold, val) != pytest.approx(scores(init, val), abs=1e-4)


def test_init_from_refuses_what_it_cannot_continue(tiny_rm, tiny_model_dir, tmp_path):
    no_rm = train_rm(tiny_rm.train, tmp_path / "a", "--init-from", str(tiny_model_dir),
                     expect_ok=False)
    assert no_rm.exit_code == 1 and "is not a reward model folder" in no_rm.output
    ratings = write_jsonl(tmp_path / "ratings.jsonl", synthetic_ratings(32, seed=3))
    other = train_rm(ratings, tmp_path / "b", "--init-from", str(tiny_rm.path),
                     "--max-length", "64", expect_ok=False)
    assert other.exit_code == 1 and "has 1 output(s); this data trains 3" in other.output
