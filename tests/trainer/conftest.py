"""Trainer-only fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PROMPTS = ["the cat", "a dog", "hello", "once upon", "red apple", "big sky"]


@pytest.fixture
def short_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path
