"""bench/vs_trl.py's fixed parts: the one reward function both trainers are given (served by our
reward service, called directly by TRL, the same numbers), the 64 fixed prompts, and the
reward-per-minute figure. The TRL run itself needs its own venv and is the benchmark's, not a
test's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.fixtures.reward_helpers import item, score, start_reward

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def vs_trl():
    sys.path.insert(0, str(BENCH))
    try:
        import vs_trl

        yield vs_trl
    finally:
        sys.path.remove(str(BENCH))


async def test_reward_service_scores_as_trl_calls_the_function(vs_trl):
    answers = ["Paris.", "The capital of France is Paris, a city on the Seine river.",
               " ".join(["word"] * 25)]
    messages = [("user", "What is the capital of France?")]
    reward = await start_reward([f"python:{vs_trl.SCRIPT}:length_reward"])
    try:
        served = await score(reward.channel, [item(a, messages=messages) for a in answers])
    finally:
        await reward.close()
    # TRL passes conversational prompts and completions as message lists.
    direct = vs_trl.length_reward(
        [[{"role": "user", "content": messages[0][1]}]] * 3,
        [[{"role": "assistant", "content": a}] for a in answers])
    assert [s.score for s in served.scores] == pytest.approx(direct)
    # Best at 12 words, falling off by 1/12 a word on both sides.
    assert direct == pytest.approx([1 - 11 / 12, 1.0, 1 - 13 / 12])


def test_prompts_are_64_fixed_distinct_chats(vs_trl):
    prompts = vs_trl.prompt_messages()
    assert len(prompts) == 64 and prompts == vs_trl.prompt_messages()
    assert len({p[0]["content"] for p in prompts}) == 64
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)


def test_reward_gain_per_minute(vs_trl):
    # Nine steps: the first three against the last three, over the 3 minutes they took.
    rewards = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    gain, per_minute = vs_trl.gain_per_minute(rewards, [20.0] * 9)
    assert gain == pytest.approx(0.6) and per_minute == pytest.approx(0.2)
    assert vs_trl.gain_per_minute([0.5], [10.0]) == (0.0, 0.0)
