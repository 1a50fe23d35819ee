"""Dynamic sampling and overlong shaping (services/trainer/ppo/sampling.py): the group filter,
the overlong penalty and the refill loop by hand; then the learner against a real policy
servicer (FakeEngine, which always stops at max_new_tokens) and a real reward service whose
reward is constant for the prompts starting with "flat".
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.plumbing.config import ConfigError
from services.trainer.clients import Sample
from services.trainer.ppo import sampling
from services.trainer.ppo.learner import Hooks, Learner
from services.trainer.ppo.settings import PPOSettings
from tests.trainer.helpers import peers, run_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCORER = f"python:{__name__}:flat_or_varied"
FLAT = 0.5


def flat_or_varied(prompts, completions, **kwargs) -> list[float]:
    """FLAT for a prompt starting with "flat"; otherwise 1 + a hash of the completion in [0, 1),
    so the samples of a group differ."""
    return [FLAT if p.startswith("flat") else 1 + zlib.crc32(c.encode()) % 1000 / 1000
            for p, c in zip(prompts, completions, strict=True)]


def settings(**overrides) -> PPOSettings:
    values = dict(algo="grpo", prompts_per_step=3, samples_per_prompt=2, max_new_tokens=32)
    return PPOSettings.load(None, **{**values, **overrides})


def sample(score: float, length: int = 4, truncated: bool = False, prompt: int = 0) -> Sample:
    return Sample(prompt_index=prompt, prompt_ids=[1], completion_ids=[7] * length,
                  completion_text="x", behaviour_logprobs=[-1.0] * length, adapter_version=1,
                  score=score, truncated=truncated)


def scripted(groups: list[list[float]]):
    """A draw(n) that hands out the scripted groups in order; records the n asked for."""
    asked: list[int] = []

    async def draw(n: int) -> list[Sample]:
        asked.append(n)
        taken = [groups.pop(0) for _ in range(n)]
        return [sample(score, prompt=p) for p, scores in enumerate(taken) for score in scores]

    return draw, asked


# ------------------------------------------------------------------------------ pure pieces


def test_groups_with_equal_rewards_carry_no_signal():
    assert sampling.informative_groups([1.0, 1.0, 0.0, 1.0, 0.3, 0.3], 2) == [False, True, False]
    assert sampling.informative_groups([2.0, 2.0, 2.0, 2.0, 2.0, 2.5], 3) == [False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        sampling.informative_groups([1.0, 2.0, 3.0], 4)


def test_overlong_penalty_is_dapos_soft_punishment():
    # L_max = 32, L_cache = 8: free up to 24 tokens, then down by 1/8 a token to -1 at 32.
    assert sampling.overlong_penalty(10, 32, 8, 1.0) == 0.0
    assert sampling.overlong_penalty(24, 32, 8, 1.0) == 0.0
    assert sampling.overlong_penalty(25, 32, 8, 1.0) == pytest.approx(-0.125)
    assert sampling.overlong_penalty(28, 32, 8, 1.0) == pytest.approx(-0.5)
    assert sampling.overlong_penalty(32, 32, 8, 1.0) == pytest.approx(-1.0)
    assert sampling.overlong_penalty(30, 32, 8, 0.5) == pytest.approx(-0.375)
    # The buffer may be the whole budget: the penalty then grows from the first token.
    assert sampling.overlong_penalty(1, 4, 4, 2.0) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="buffer 9"):
        sampling.overlong_penalty(30, 8, 9, 1.0)


def test_filter_and_penalty_shape_the_samples():
    batch = [sample(1.0, length=32, truncated=True), sample(1.0, length=28), sample(1.0)]
    sampling.shape(batch, settings(overlong="filter"))
    assert [x.in_loss for x in batch] == [False, True, True]
    assert [x.score for x in batch] == [1.0, 1.0, 1.0]

    batch = [sample(1.0, length=32, truncated=True), sample(1.0, length=28), sample(1.0)]
    sampling.shape(batch, settings(overlong="penalty", overlong_buffer=8, overlong_penalty=0.5))
    assert [x.score for x in batch] == pytest.approx([0.5, 0.75, 1.0])
    assert all(x.in_loss for x in batch)


async def test_dropped_groups_are_refilled_from_further_prompts():
    flat, varied = [1.0, 1.0], [0.0, 1.0]
    draw, asked = scripted([flat, varied, flat,  varied, flat,  [2.0, 3.0]])
    got = await sampling.collect(draw, settings(dynamic_sampling=True))
    assert asked == [3, 2, 1]  # each refill asks for the groups still missing
    assert [x.score for x in got.samples] == [0.0, 1.0, 0.0, 1.0, 2.0, 3.0]
    assert [x.prompt_index for x in got.samples] == [0, 0, 1, 1, 2, 2]
    assert got.figures() == {
        "sampling/dropped_share": 3 / 6, "sampling/refill_rounds": 2.0,
        "sampling/groups_short": 0.0, "sampling/truncated_share": 0.0,
        "sampling/overlong_penalty": 0.0}


async def test_when_refills_run_out_the_step_trains_on_what_it_has():
    flat, varied = [1.0, 1.0], [0.0, 1.0]
    draw, asked = scripted([flat, varied, flat, flat, flat])
    got = await sampling.collect(draw, settings(dynamic_sampling=True, max_refill_rounds=1))
    assert asked == [3, 2]
    assert [x.score for x in got.samples] == [0.0, 1.0]
    assert got.figures()["sampling/groups_short"] == 2.0
    assert got.figures()["sampling/dropped_share"] == 4 / 5

    # No group with a signal at all: the last draw trains rather than nothing.
    draw, asked = scripted([flat] * 6)
    got = await sampling.collect(draw, settings(dynamic_sampling=True, max_refill_rounds=1))
    assert asked == [3, 3] and len(got.samples) == 6
    assert got.figures()["sampling/groups_short"] == 3.0
    assert got.figures()["sampling/dropped_share"] == 1.0


async def test_without_dynamic_sampling_one_draw_is_the_batch():
    draw, asked = scripted([[1.0, 1.0]] * 3)
    got = await sampling.collect(draw, settings())
    assert asked == [3] and len(got.samples) == 6
    assert got.figures()["sampling/dropped_share"] == 0.0


def test_settings_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match="needs algo grpo or rloo"):
        settings(algo="ppo", samples_per_prompt=1, dynamic_sampling=True)
    with pytest.raises(ConfigError, match="overlong_buffer"):
        settings(overlong="penalty", max_new_tokens=8, overlong_buffer=9)


# ------------------------------------------------------------------------------ the learner


@pytest.fixture
def mixed_prompts(tmp_path) -> Path:
    path = tmp_path / "mixed.jsonl"
    words = ["cat", "dog", "sky"]
    path.write_text("".join(json.dumps({"prompt": f"{kind} {w}"}) + "\n"
                            for kind in ("flat", "vary") for w in words))
    return path


class Recording(Learner):
    """The learner, keeping each step's trained batch as (prompt ids, score, in_loss) rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[tuple]] = []

    def _update_all(self, samples):
        self.batches.append([(tuple(x.prompt_ids), x.score, x.in_loss) for x in samples])
        return super()._update_all(samples)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_learner_trains_full_batches_of_informative_groups(tiny_model_dir, mixed_prompts,
                                                                  tmp_path):
    out = tmp_path / "ds"
    async with peers(tiny_model_dir, tmp_path, scorer=SCORER) as (policy, reward):
        run = run_settings(tiny_model_dir, mixed_prompts, out, policy, reward, algo="grpo",
                           steps=3, dynamic_sampling=True, max_refill_rounds=10)
        learner = Recording(run)
        await learner.run()
    assert len(learner.batches) == 3
    for batch in learner.batches:
        # prompts_per_step groups of samples_per_prompt, none of them a flat prompt's.
        assert len(batch) == 2 * 2
        assert all(score != FLAT for _, score, _ in batch)
    metrics = rows(out)
    assert [m["sampling/groups_short"] for m in metrics] == [0.0, 0.0, 0.0]
    # Six varied groups take at least one whole epoch of the six prompts: its flat ones dropped.
    assert any(m["sampling/dropped_share"] > 0 for m in metrics)
    assert all(m["sampling/truncated_share"] == 1.0 for m in metrics)  # FakeEngine never stops


async def test_resume_takes_up_the_data_where_the_last_trained_step_left_it(
        tiny_model_dir, mixed_prompts, tmp_path):
    """With prefetching (max_staleness=1) step 2's prompts are drawn while step 1 trains; a run
    that stops after step 1 draws them again on resume, as the uninterrupted run trained them."""

    def stop_after_step_1(metrics: dict) -> None:
        if metrics["step"] == 1:
            raise RuntimeError("stopped after step 1")

    async with peers(tiny_model_dir, tmp_path, scorer=SCORER) as (policy, reward):
        common = dict(algo="grpo", steps=3, dynamic_sampling=True, max_refill_rounds=10,
                      max_staleness=1)
        whole = Recording(run_settings(tiny_model_dir, mixed_prompts, tmp_path / "whole", policy,
                                       reward, **common))
        await whole.run()
        cut = run_settings(tiny_model_dir, mixed_prompts, tmp_path / "cut", policy, reward,
                           **common)
        first = Recording(cut, Hooks(on_metrics=stop_after_step_1))
        with pytest.raises(RuntimeError, match="stopped after step 1"):
            await first.run()
        resumed = Recording(cut)
        await resumed.run()

    def prompts_of(batch) -> list[tuple]:
        return [ids for ids, _, _ in batch]

    assert resumed.step == 3 and len(resumed.batches) == 2
    assert prompts_of(first.batches[0]) == prompts_of(whole.batches[0])
    assert [prompts_of(b) for b in resumed.batches] == [prompts_of(b) for b in whole.batches[1:]]
    assert [m["step"] for m in rows(tmp_path / "cut")] == [1, 2, 3]


async def test_no_signal_anywhere_trains_the_last_draw_with_the_penalty(tiny_model_dir,
                                                                        tmp_path):
    prompts = tmp_path / "flat.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"flat {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "flat"
    async with peers(tiny_model_dir, tmp_path, scorer=SCORER) as (policy, reward):
        # Every completion is 4 tokens (max_new_tokens): the whole penalty, 0.25.
        run = run_settings(tiny_model_dir, prompts, out, policy, reward, algo="grpo", steps=2,
                           dynamic_sampling=True, max_refill_rounds=2, overlong="penalty",
                           overlong_buffer=2, overlong_penalty=0.25)
        learner = Recording(run)
        await learner.run()
    assert learner.step == 2
    for batch in learner.batches:
        assert [score for _, score, _ in batch] == pytest.approx([FLAT - 0.25] * 4)
    for m in rows(out):
        assert m["sampling/refill_rounds"] == 2.0 and m["sampling/groups_short"] == 2.0
        assert m["sampling/dropped_share"] == 1.0
        assert m["sampling/overlong_penalty"] == pytest.approx(-0.25)
        assert m["reward/mean"] == pytest.approx(FLAT - 0.25)
    # Three draws of two prompts a step: the cursor stands at prompt 12 of 5-prompt epochs.
    state = json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())
    assert (state["cursor"]["epoch"], state["cursor"]["index"]) == (2, 2)


async def test_overlong_filter_keeps_truncated_completions_out_of_the_loss(
        tiny_model_dir, mixed_prompts, tmp_path):
    def trained_weights(out: Path) -> dict:
        return load_file(out / "checkpoints" / "step-1" / "policy" / "adapter_model.safetensors")

    def initial_weights(out: Path) -> dict:
        return load_file(out / "initial-adapter" / "adapter_model.safetensors")

    async with peers(tiny_model_dir, tmp_path, scorer=SCORER) as (policy, reward):
        for mode in ("none", "filter"):
            # Dynamic sampling: every trained group has a signal to learn from, unfiltered.
            run = run_settings(tiny_model_dir, mixed_prompts, tmp_path / mode, policy, reward,
                               algo="grpo", steps=1, overlong=mode, dynamic_sampling=True,
                               max_refill_rounds=10)
            learner = Recording(run)
            await learner.run()
            assert all(in_loss == (mode == "none") for _, _, in_loss in learner.batches[0])
    # FakeEngine truncates every completion: filtered, the step has nothing to learn from.
    before, after = initial_weights(tmp_path / "filter"), trained_weights(tmp_path / "filter")
    assert all(before[k].equal(after[k]) for k in before)
    before, after = initial_weights(tmp_path / "none"), trained_weights(tmp_path / "none")
    assert not all(before[k].equal(after[k]) for k in before)
    assert rows(tmp_path / "filter")[0]["sampling/truncated_share"] == 1.0


def test_run_config_carries_the_sampling_settings(tmp_path):
    from rlhf.plumbing.errors import InvalidArgument
    from rlhf.v1 import trainer_pb2
    from services.trainer.config import TrainerConfig
    from services.trainer.ppo.runs import settings_from_proto, settings_to_proto

    cfg = TrainerConfig.load(data_dir=tmp_path, policy_addr=["10.0.0.1:50051"],
                             reward_addr=["10.0.0.2:50052"], prompts=tmp_path / "p.jsonl")
    grpo = trainer_pb2.ALGORITHM_GRPO
    run = settings_from_proto(trainer_pb2.RunConfig(
        algorithm=grpo, dynamic_sampling=True, max_refill_rounds=5, overlong="penalty",
        overlong_buffer=4, overlong_penalty=0.5), cfg, "r1")
    assert (run.dynamic_sampling, run.max_refill_rounds, run.overlong, run.overlong_buffer,
            run.overlong_penalty) == (True, 5, "penalty", 4, 0.5)
    back = settings_to_proto(run)
    assert (back.dynamic_sampling, back.max_refill_rounds, back.overlong, back.overlong_buffer,
            back.overlong_penalty) == (True, 5, "penalty", 4, 0.5)
    default = settings_from_proto(trainer_pb2.RunConfig(algorithm=grpo), cfg, "r2")
    assert (default.dynamic_sampling, default.overlong) == (False, "none")
    for bad in (dict(overlong="cut"), dict(overlong_penalty=-1.0),
                dict(dynamic_sampling=True, algorithm=trainer_pb2.ALGORITHM_PPO)):
        with pytest.raises(InvalidArgument):
            settings_from_proto(trainer_pb2.RunConfig(**{"algorithm": grpo, **bad}), cfg, "r3")
