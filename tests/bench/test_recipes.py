"""bench/recipes.py: its config names and reward window by hand, and a smoke run on the tiny
model (2 steps, 2 configs, a real vLLM policy and reward service) whose last line is the one
JSON line, with a row per config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def recipes():
    sys.path.insert(0, str(BENCH))
    try:
        import recipes

        yield recipes
    finally:
        sys.path.remove(str(BENCH))


def test_configs_name_a_loss_and_a_mismatch_setting(recipes):
    assert recipes.overrides("gspo:none") == {"algo": "grpo", "loss_type": "gspo",
                                              "mismatch_correction": "none"}
    assert recipes.overrides("ppo:default") == {"algo": "ppo"}
    assert len(recipes.DEFAULT_CONFIGS) == 10 and "cispo:none" not in recipes.DEFAULT_CONFIGS
    assert recipes.parse_configs("all") == recipes.ALL_CONFIGS
    assert recipes.parse_configs("dapo:none, ppo:none") == ["dapo:none", "ppo:none"]
    with pytest.raises(SystemExit, match="unknown config.*dapo:tis"):
        recipes.parse_configs("dapo:tis")


def test_start_and_end_are_means_of_three_steps(recipes):
    rewards = [0.1, 0.2, 0.3, 0.5, 0.5, 0.6, 0.7, 0.8]
    start, end, gain = recipes.start_end_gain(rewards)
    assert (start, end, gain) == pytest.approx((0.2, 0.7, 0.5))
    assert recipes.start_end_gain([0.1, 0.4]) == pytest.approx((0.1, 0.4, 0.3))


@pytest.mark.vllm
@pytest.mark.slow
def test_smoke_run_ends_with_one_json_line(vllm_cpu_env):
    done = subprocess.run(
        [sys.executable, str(BENCH / "recipes.py"), "--model", "tiny", "--steps", "2",
         "--configs", "grpo:none,ppo:default", "--prompts-per-step", "2", "--samples", "2",
         "--tokens", "4", "--policy-dtype", "float32"],
        capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert all(not line.startswith("{") for line in lines[:-1])
    assert figures["bench"] == "recipes" and figures["steps"] == 2 and figures["seed"] == 0
    assert list(figures["runs"]) == ["grpo:none", "ppo:default"]
    for run in figures["runs"].values():
        assert len(run["rewards"]) == 2
        assert run["gain"] == pytest.approx(run["end"] - run["start"], abs=1e-3)
        assert {"algo", "loss_type", "mismatch_correction", "seconds_per_step"} <= set(run)
    assert figures["runs"]["grpo:none"]["mismatch_correction"] == "none"
    assert figures["runs"]["ppo:default"]["algo"] == "ppo"
    assert figures["best"] in figures["runs"]
