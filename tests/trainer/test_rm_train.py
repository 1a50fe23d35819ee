"""`rlhf train rm`: the loss and metrics by hand, training to a separable synthetic set, binned
ratings, bad data lines, resuming, adapter vs merged output, and the backbones; every trained
folder is loaded the way `rm:PATH` loads it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.formats import rm_default_format
from services.reward.items import Item
from services.reward.rm import RewardModel
from services.trainer.errors import TrainError
from services.trainer.rm import model as rm_model
from services.trainer.rm.data import bin_index, rating_bins
from tests.fixtures.reward_helpers import history, synthetic_ratings, train_rm, write_jsonl


def served(path: Path, **kw) -> RewardModel:
    model = RewardModel(path, **kw)
    model.load()
    return model


def pair_items(rows):
    chosen = [Item(r["chosen"], prompt=r["prompt"]) for r in rows]
    rejected = [Item(r["rejected"], prompt=r["prompt"]) for r in rows]
    return chosen, rejected


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- bins ---------------------------------------------------------------------------------------


def test_rating_bins_by_hand():
    assert rating_bins([1, 5, 3], None) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rating_bins([0.0, 0.5, 1.0], 3) == [0.0, 0.5, 1.0]
    assert bin_index(0.8, [0.0, 0.5, 1.0]) == 2
    with pytest.raises(TrainError, match="--bins"):
        rating_bins([0.1, 0.7], None)


# ---- training ----------------------------------------------------------------------------------


def test_synthetic_separable_pairs_reach_90_percent_held_out(tiny_rm):
    last = tiny_rm.history[-1]
    assert len(tiny_rm.history) == 2
    assert last["val_accuracy"] >= 0.9, tiny_rm.history
    assert tiny_rm.history[0]["train_loss"] > last["train_loss"]
    # The saved folder, loaded as `rm:PATH` loads it, ranks the held-out pairs the same way.
    model = served(tiny_rm.path)
    assert model.format == "chat"
    chosen, rejected = pair_items(read_rows(tiny_rm.val))
    rc, rr = model.score(chosen), model.score(rejected)
    accuracy = sum(c > r for c, r in zip(rc, rr, strict=True)) / len(rc)
    assert accuracy == pytest.approx(last["val_accuracy"], abs=0.011)


def test_trainer_and_service_read_text_the_same(tiny_model_dir):
    from transformers import AutoTokenizer

    from services.reward import rm_text

    prompts = ["What is 2 + 2?", "Tell me a story about a very long road " * 20]
    responses = ["It is 4.", "Once upon a time " * 30]
    items = [Item(r, prompt=p) for p, r in zip(prompts, responses, strict=True)]
    for folder, fmt in [(tiny_model_dir, "chat"), (rm_model.minilm_dir(), "pair")]:
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert rm_default_format(tok) == fmt
        a = rm_model.encode(tok, fmt, prompts, responses, 64)
        b = rm_text.encode(tok, fmt, items, 64)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (fmt, key)
        assert a["input_ids"].shape == (2, 64)  # the long one was cut ...
        ends = tok.decode(a["input_ids"][1][a["attention_mask"][1].bool()][-12:])
        assert "upon a time" in ends  # ... from the left: the response's end survives


def test_bad_jsonl_lines_are_reported_with_file_and_line(tmp_path, tiny_model_dir):
    good = {"prompt": "q", "chosen": "yes good", "rejected": "no bad"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "q", "chosen": "", "rejected": "x"}),
        "",
        json.dumps({"instruction": "q", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "q", "response": "a", "rating": 3}),
        json.dumps({"chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "q", "text": "neither"}),
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rm"
    result = train_rm(data, out, "--model", str(tiny_model_dir), "--val-fraction", "0",
                      expect_ok=False)
    assert result.exit_code == 1
    text = result.output
    for lineno, why in [(2, "not JSON"), (3, "expected a JSON object"),
                        (4, '"chosen" and "rejected" are the same text'), (5, '"chosen" is empty'),
                        (8, "a rating line in a file of preference lines"),
                        (9, 'has no "prompt"'), (10, "neither a preference line")]:
        assert f"{data}:{lineno}: {why}" in text, text
    for fine in (1, 6, 7):
        assert f"{data}:{fine}:" not in text
    assert not (out / "rlhf_reward.json").exists()

    result = train_rm(data, out, "--model", str(tiny_model_dir), "--val-fraction", "0",
                      "--skip-bad-lines", "--backbone", "frozen")
    assert f"skipped {data}:2: not JSON" in result.output
    assert "2 training / 0 validation preference pairs" in result.output
    assert (out / "rlhf_reward.json").exists()


def test_missing_files_and_backbones_are_clear_errors(tmp_path, tiny_model_dir):
    result = train_rm(tmp_path / "absent.jsonl", tmp_path / "o", "--model", str(tiny_model_dir),
                      expect_ok=False)
    assert result.exit_code == 1 and "absent.jsonl: cannot read" in result.output
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    result = train_rm(data, tmp_path / "o", "--model", str(tmp_path / "nomodel"),
                      expect_ok=False)
    assert result.exit_code == 1 and "nomodel has no config.json" in result.output


def test_ratings_train_binned_outputs_served_as_expected_rating(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "ratings.jsonl", synthetic_ratings(96, seed=3))
    out = tmp_path / "rm"
    result = train_rm(data, out, "--model", str(tiny_model_dir), "--backbone", "full",
                      "--epochs", "2", "--lr", "1e-3", "--val-fraction", "0.25")
    assert "ratings (3 bins)" in result.output
    meta = json.loads((out / "rlhf_reward.json").read_text())
    assert (meta["num_labels"], meta["bins"], meta["data"]) == (3, [1.0, 2.0, 3.0], "ratings")
    record = meta["history"][-1]
    assert {"val_loss", "val_accuracy", "val_bin_accuracy", "train_bin_accuracy"} <= set(record)

    model = served(out)
    items = [Item("We find good music.", prompt="How was your day?"),
             Item("The cat sees a red apple.", prompt="How was your day?")]
    rewards = model.score(items)
    assert all(1.0 <= r <= 3.0 for r in rewards)
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    from services.reward.rm_text import encode

    with torch.no_grad():
        logits = hf(**encode(model.tokenizer, "chat", items, 64)).logits
    by_hand = (logits.softmax(-1) * torch.tensor([1.0, 2.0, 3.0])).sum(-1)
    assert rewards == pytest.approx(by_hand.tolist(), abs=1e-5)


def _adapter_tensors(out: Path) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


def test_resume_continues_exactly_and_merge_serves_the_same(tmp_path, tiny_model_dir,
                                                            synthetic_data):
    train, _ = synthetic_data
    data = write_jsonl(tmp_path / "small.jsonl", read_rows(train)[:64])
    common = ("--model", str(tiny_model_dir), "--epochs", "2", "--batch-size", "16",
              "--val-fraction", "0.25", "--lr", "1e-3", "--lora-r", "4")

    straight = tmp_path / "straight"
    train_rm(data, straight, *common)
    assert (straight / "adapter_config.json").exists()  # LoRA saves an adapter by default

    resumed = tmp_path / "resumed"
    first = train_rm(data, resumed, *common, "--max-steps", "5")
    assert "stopped after 5 steps" in first.output
    assert not (resumed / "rlhf_reward.json").exists()
    second = train_rm(data, resumed, *common)
    assert "resuming from" in second.output and "epoch 2, step 2" in second.output
    a, b = _adapter_tensors(straight), _adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert history(straight) == history(resumed)

    again = train_rm(data, resumed, *common)
    assert "nothing to do" in again.output
    changed = train_rm(data, resumed, *common[:-2], "--lora-r", "8", expect_ok=False)
    assert changed.exit_code == 1 and "lora_r" in changed.output and "--restart" in changed.output

    merged = tmp_path / "merged"
    train_rm(data, merged, *common, "--merge")
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    items = [Item(r["chosen"], prompt=r["prompt"]) for r in read_rows(data)[:8]]
    assert served(merged).score(items) == pytest.approx(served(straight).score(items), abs=1e-5)


@pytest.mark.slow
def test_default_smollm2_backbone_trains_and_serves(tmp_path, synthetic_data):
    from rlhf.paths import default_model_dir

    if not (default_model_dir() / "config.json").exists():
        pytest.skip("default model not prepared (rlhf model prepare)")
    train, _ = synthetic_data
    data = write_jsonl(tmp_path / "few.jsonl", read_rows(train)[:8])
    out = tmp_path / "rm"
    result = train_rm(data, out, "--model", "default", "--batch-size", "4", "--val-fraction",
                      "0.5", "--lora-r", "4", "--lora-last-layers", "2", "--max-length", "48")
    assert "SmolLM2-135M-Instruct (lora)" in result.output
    model = served(out, max_tokens=48)
    assert model.format == "chat"
    assert model.model.config.num_labels == 1
    rewards = model.score([Item("Great!", prompt="Hi"), Item("Bad.", prompt="Hi")])
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
