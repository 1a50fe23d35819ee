"""Helpers for reward tests: request builders, servers, synthetic data, training runs, and the
user reward functions the servers load as `python:tests.reward_helpers:NAME`."""

from __future__ import annotations

import asyncio
import json
import math
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from click.testing import CliRunner

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc

# ---- requests ----------------------------------------------------------------------------------


def item(completion: str, prompt: str = "Say something.", reference: str = "",
         messages=None, **metadata) -> reward_pb2.ScoreItem:
    msgs = [common_pb2.ChatMessage(role=r, content=c) for r, c in (messages or [])]
    return reward_pb2.ScoreItem(
        prompt="" if messages else prompt, prompt_messages=msgs, completion=completion,
        reference=reference, metadata={k: str(v) for k, v in metadata.items()},
    )


def stub(channel) -> reward_pb2_grpc.RewardServiceStub:
    return reward_pb2_grpc.RewardServiceStub(channel)


async def score(channel, items, timeout: float = 60) -> reward_pb2.ScoreResponse:
    return await stub(channel).Score(reward_pb2.ScoreRequest(items=items), timeout=timeout)


def by_name(item_score) -> dict[str, float]:
    return {part.scorer: part.score for part in item_score.by_scorer}


# ---- servers -----------------------------------------------------------------------------------


@dataclass
class RewardHandle:
    server: object
    channel: grpc.aio.Channel

    @property
    def app(self):
        return self.server.app

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()

    async def close(self) -> None:
        await self.channel.close()
        await self.server.shutdown()


async def start_reward(scorers: list[str], **overrides) -> RewardHandle:
    from rlhf.plumbing.server import GrpcServer
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    cfg = RewardConfig.load(grpc_port=0, metrics_port=0, scorer=scorers,
                            drain_grace_seconds=2, **overrides)
    server = await GrpcServer(cfg, RewardApp(cfg)).start()
    return RewardHandle(server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))


def metric_value(name: str, labels: dict | None = None) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# ---- synthetic data ----------------------------------------------------------------------------

QUESTIONS = ["How was your day?", "What do you think of the plan?", "Tell me about the book.",
             "How is the weather?", "What did the teacher say?", "Is the house nice?"]
FILLER = ["the cat sees a red apple", "my friend reads the long story", "we find good music",
          "the robot builds a small house", "a bird gives some water",
          "the farmer takes warm bread", "our team writes a new song", "the child knows the river"]
GOOD = ["good", "great", "happy", "nice", "yes"]
BAD = ["bad", "sad", "poor", "awful", "no"]


def _with_word(rng: random.Random, words: list[str]) -> str:
    parts = rng.choice(FILLER).split()
    parts.insert(rng.randrange(len(parts) + 1), rng.choice(words))
    return " ".join(parts).capitalize() + "."


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Separable preferences: the chosen answer holds a 'good' word, the rejected a 'bad' one,
    each at a random place in a random filler sentence."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(QUESTIONS), "chosen": _with_word(rng, GOOD),
             "rejected": _with_word(rng, BAD)} for _ in range(n)]


def synthetic_ratings(n: int, seed: int) -> list[dict]:
    """Ratings 1..3: a 'good' word rates 3, a 'bad' one 1, neither 2."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rating = rng.choice([1, 2, 3])
        text = {3: lambda: _with_word(rng, GOOD), 1: lambda: _with_word(rng, BAD),
                2: lambda: rng.choice(FILLER).capitalize() + "."}[rating]()
        rows.append({"prompt": rng.choice(QUESTIONS), "response": text, "rating": rating})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- training ----------------------------------------------------------------------------------


def train_rm(data: Path, out: Path, *args: str, expect_ok: bool = True):
    """Runs `rlhf train rm` in-process on one torch thread (on a busy 2-core machine, two
    threads spin against other processes and run several times slower); returns the result."""
    import torch

    from services.trainer.rm_train import train_rm as command

    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(
            command, ["--data", str(data), "--out", str(out), "--no-progress", "--threads", "1",
                      *args],
            catch_exceptions=False,
        )
    finally:
        torch.set_num_threads(threads)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def history(out: Path) -> list[dict]:
    return json.loads((out / "rlhf_reward.json").read_text())["history"]


# ---- user reward functions (loaded by servers as python:tests.reward_helpers:NAME) -------------


def word_count(prompts, completions, **kwargs):
    """Number of words in the completion (text or TRL conversational shape)."""
    return [len(_content(c).split()) for c in completions]


def echo_kwargs(prompts, completions, reference, **kwargs):
    """Encodes what it was called with, so a test can check the TRL-style arguments: 1000 * (1
    if the prompt was a chat) + 100 * len(reference) + number of extra keyword lists."""
    return [1000 * isinstance(p, list) + 100 * len(r) + len(kwargs)
            for p, r in zip(prompts, reference, strict=True)]


async def async_length(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [float(len(_content(c))) for c in completions]


def flaky(prompts, completions, mode=None, **kwargs):
    """Misbehaves on request: metadata mode=raise | short | nan | text; else 1.0 per item."""
    modes = set(mode or [])
    if "raise" in modes:
        raise RuntimeError("flaky was asked to fail")
    if "short" in modes:
        return [1.0] * (len(completions) - 1)
    if "nan" in modes:
        return [math.nan] * len(completions)
    if "text" in modes:
        return "not a list"
    return [1.0] * len(completions)


def _content(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion
