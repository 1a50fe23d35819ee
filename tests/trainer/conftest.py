"""Trainer-only fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

PROMPTS = ["the cat", "a dog", "hello", "once upon", "red apple", "big sky"]


@pytest.fixture
def short_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for the module: two OpenMP threads on two cores shared with other work
    run the tiny model many times slower than one (the threads spin-wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
