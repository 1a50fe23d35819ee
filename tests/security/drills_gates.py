"""Security drills for the learner's gates and its last good checkpoint (issue 21 points 1-2):
a real policy servicer (FakeEngine, no vLLM) and a real reward service on 127.0.0.1, tiny model.

- 21.1: a reward that overflows the learner's float32 makes a NaN step: it is rolled back and
  never checkpointed or pushed, and the run stops naming the gate;
- 21.1: a score the learner cannot hold (a finite double beyond float32's range, which would be
  inf in its tensors) is refused where it enters the learner;
- 21.2: the last good checkpoint survives keep_checkpoints pruning, and a run resumes from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.trainer.clients import BadAnswer, Sample, Services
from services.trainer.data import PromptRecord
from services.trainer.ppo import checkpoint
from services.trainer.ppo.gates import GateFailed
from services.trainer.ppo.learner import Learner
from tests.trainer.helpers import peers, run_settings


@pytest.fixture
def gates_prompts(tmp_path) -> Path:
    path = tmp_path / "gates-prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n"
                            for p in ("the cat", "a dog", "hello", "once upon")))
    return path


def gates_scorer(tmp_path: Path, value: float) -> str:
    """A reward spec (a user function) that scores every completion `value`."""
    path = tmp_path / "gates_reward.py"
    path.write_text(f"def score(prompts, completions, **kwargs):\n"
                    f"    return [{value!r} for _ in completions]\n")
    return f"python:{path}:score"


async def gates_versions(addr: str, name: str) -> list[int]:
    async with grpc.aio.insecure_channel(addr) as ch:
        listed = await policy_pb2_grpc.PolicyServiceStub(ch).ListAdapters(
            policy_pb2.ListAdaptersRequest(name=name))
    return sorted(a.adapter.version for a in listed.adapters)


async def test_a_nan_step_is_never_pushed(tiny_model_dir, gates_prompts, tmp_path):
    """21.1: a NaN step is never pushed: a reward of 3e38 (finite, but its square and its
    batch sums overflow float32) turns the PPO step's losses NaN. The gate rolls the step back:
    no checkpoint holds its weights, no adapter of it reaches the policy, the run fails with
    the gate's reason after max_bad_steps, and metrics.jsonl records each failed step."""
    out = tmp_path / "nan-drill"
    async with peers(tiny_model_dir, tmp_path, scorer=gates_scorer(tmp_path, 3.0e38)) as (
            policy, reward):
        run = run_settings(tiny_model_dir, gates_prompts, out, policy, reward, algo="ppo",
                           steps=4, max_bad_steps=2)
        learner = Learner(run)
        with pytest.raises(GateFailed, match=r"failed its gates \(non-finite loss"):
            await learner.run()
        assert await gates_versions(policy, out.name) == [1]  # the starting adapter only
    assert not list((out / "checkpoints").glob("step-*"))
    assert all(bool(torch.isfinite(p).all()) for p in learner.model.trainable_parameters())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["gate/failed"], r["adapter/version"]) for r in lines] == [(1.0, 1), (1.0, 1)]


async def test_a_non_finite_reward_is_refused(tiny_model_dir, gates_prompts, tmp_path):
    """21.1: non-finite reward refused: a reward service (a user function) scoring 1e300, a
    finite double that is inf in the learner's float32 tensors, fails the Score call in the
    learner with BadAnswer naming the range, before any step trains: nothing is pushed after
    the starting adapter, no metrics line is written."""
    out = tmp_path / "inf-drill"
    async with peers(tiny_model_dir, tmp_path, scorer=gates_scorer(tmp_path, 1e300)) as (
            policy, reward):
        services = Services([policy], [reward], "drill", retry_max=1.0)
        try:
            samples = [Sample(0, [1], [2], "x", [-0.1], 1), Sample(0, [1], [3], "y", [-0.2], 1)]
            with pytest.raises(BadAnswer, match=r"score 1e\+300 for item 0, beyond the "
                               r"learner's float32 range"):
                await services.score([PromptRecord(prompt="hi")], samples)
        finally:
            await services.close()
        run = run_settings(tiny_model_dir, gates_prompts, out, policy, reward, steps=2)
        with pytest.raises(BadAnswer, match=re.escape(f"reward at {reward}")):
            await Learner(run).run()
        assert await gates_versions(policy, out.name) == [1]
    assert not (out / "metrics.jsonl").exists()


class GatesTinyModel(torch.nn.Module):
    """What checkpoint.save needs of a model: trainable tensors and an adapter folder."""

    def __init__(self):
        super().__init__()
        self.lora = torch.nn.Parameter(torch.zeros(2, 2))

    def save_policy_adapter(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text("{}")
        save_file({"lora": self.lora.detach().clone()}, out / "adapter_model.safetensors")
        return out


def test_last_good_survives_pruning(tmp_path):
    """21.2: last good survives pruning: with keep_checkpoints 1, the checkpoint of the newest
    promoted version stays on disk while later, unpromoted checkpoints (a diverging stretch)
    replace each other, and resume_from last_good loads its weights."""
    out = tmp_path / "run"
    model = GatesTinyModel()
    optimizer = torch.optim.AdamW(model.parameters())

    def save(step: int) -> Path:
        with torch.no_grad():
            model.lora.fill_(float(step))
        return checkpoint.save(out, step, model=model, optimizer=optimizer, keep=1,
                               state={"version": step + 1, "cursor": {}, "kl_ctl": {}})

    promoted = save(1)
    assert checkpoint.mark_last_good(out, promoted)
    for step in (2, 3, 4):
        save(step)
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == ["step-1", "step-4"]
    folder = checkpoint.resume_folder(out, "last_good")
    assert folder == promoted
    state = checkpoint.load(folder, model=model, optimizer=optimizer)
    assert state["version"] == 2 and torch.equal(model.lora, torch.ones(2, 2))
