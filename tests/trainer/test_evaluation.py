"""Evaluation during training: the pure promotion rule, and learner runs against a real policy
servicer (FakeEngine; one run on the shared vLLM policy) and a real reward service where each
evaluated version is generated on the eval prompts with its version pinned before it is active,
its figures reach metrics.jsonl and the trainer's gauges, and a version whose eval reward drops
is not activated."""

from __future__ import annotations

import json
import math
import os
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from rlhf.plumbing.config import ConfigError
from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.trainer.ppo import checkpoint
from services.trainer.ppo.evaluation import (
    SEED_OFFSET,
    SEED_SCALE,
    EvalResult,
    is_due,
    should_promote,
    summarize,
)
from services.trainer.ppo.learner import Hooks, Learner
from tests.fixtures.policy_helpers import ADMIN
from tests.trainer.helpers import run_settings

# The scripted reward reads its mode from this variable: the test lowers it mid-run.
MODE = "RLHF_TEST_EVAL_REWARD_MODE"
EVAL_PROMPTS = ["eval: a red", "eval: the blue", "eval: one two"]


def scripted_reward(prompts, completions, **kwargs) -> list[float]:
    """Eval prompts score 1.0, or 0.0 once the mode is "low"; training prompts score by length
    (some spread, so the update has a signal)."""
    low = os.environ.get(MODE) == "low"
    return [(0.0 if low else 1.0) if str(p).startswith("eval:") else (len(c) % 7) / 7
            for p, c in zip(prompts, completions, strict=True)]


# ---------------------------------------------------------------------------- the pure rule


def result(version: int, mean: float) -> EvalResult:
    return EvalResult(version, mean, 0.1, 8)


def test_without_a_gate_every_version_passes():
    ok, reason = should_promote(result(3, -5.0), result(2, 1.0), None)
    assert ok and "max_eval_drop unset" in reason
    assert should_promote(None, result(2, 1.0), None)[0]


def test_the_first_evaluated_version_is_the_baseline():
    ok, reason = should_promote(result(1, 0.2), None, 0.1)
    assert ok and "baseline" in reason


def test_an_unevaluated_version_is_held_back_under_a_gate():
    ok, reason = should_promote(None, result(1, 0.2), 0.1)
    assert not ok and "not evaluated" in reason


def test_a_drop_beyond_max_eval_drop_is_refused_with_its_figures():
    ok, reason = should_promote(result(3, 0.5), result(2, 0.75), 0.2)
    assert not ok
    assert "dropped" in reason and "0.5000" in reason and "0.7500" in reason
    assert "v2" in reason and "v3" in reason and "0.2500" in reason


def test_a_drop_within_max_eval_drop_or_a_gain_passes():
    assert should_promote(result(3, 0.55), result(2, 0.75), 0.2)[0]  # 0.2 = the bound
    assert should_promote(result(3, 0.9), result(2, 0.75), 0.0)[0]
    assert should_promote(result(3, 0.75), result(2, 0.75), 0.0)[0]
    assert not should_promote(result(3, 0.7499), result(2, 0.75), 0.0)[0]


def test_a_non_finite_eval_reward_is_refused_even_as_the_first():
    ok, reason = should_promote(result(1, math.nan), None, 0.1)
    assert not ok and "nan" in reason


def test_a_decision_becomes_the_baseline_only_when_it_promotes(tmp_path):
    from services.trainer.ppo.evaluation import Evaluation
    from services.trainer.ppo.metrics import EVAL_KEYS
    from services.trainer.ppo.settings import PPOSettings

    evals = tmp_path / "e.jsonl"
    evals.write_text('{"prompt": "x"}\n')
    evaluation = Evaluation.from_settings(PPOSettings.load(None, eval_prompts=evals,
                                                           max_eval_drop=0.1))
    assert evaluation.decide(result(1, 0.5))[0] and evaluation.promoted == result(1, 0.5)
    promote, reason, figures = evaluation.decide(result(2, 0.3))
    assert not promote and evaluation.promoted == result(1, 0.5)
    assert figures == {"eval/promoted": 0, "eval/reason": reason, "eval/version": 2,
                       "eval/reward_mean": 0.3, "eval/reward_std": 0.1, "eval/samples": 8,
                       "eval/baseline_version": 1, "eval/baseline_reward_mean": 0.5,
                       "eval/baseline_reward_std": 0.1}
    assert set(figures) == set(EVAL_KEYS)
    # kept in the run folder, and read back by the next run on it
    evaluation.save(tmp_path)
    again = Evaluation.from_settings(evaluation.s)
    again.restore(tmp_path)
    assert again.promoted == result(1, 0.5)
    (tmp_path / "evaluation.json").write_text("{torn")
    again.restore(tmp_path)  # a damaged file is ignored: the next evaluated version is the base
    assert again.promoted == result(1, 0.5)


def test_summary_and_schedule():
    assert summarize(4, [1.0, 3.0]) == EvalResult(4, 2.0, 1.0, 2)
    with pytest.raises(ValueError):
        summarize(4, [])
    # the starting version, every 2 steps, and the last one (5) or the one a stop ends with
    assert [s for s in range(6) if is_due(s, 2, 5)] == [0, 2, 4, 5]
    assert is_due(3, 2, 5, stopping=True)


def test_max_eval_drop_needs_eval_prompts(tmp_path):
    from services.trainer.ppo.settings import PPOSettings

    with pytest.raises(ConfigError, match="max_eval_drop .* needs eval_prompts"):
        PPOSettings.load(None, max_eval_drop=0.1)
    with pytest.raises(ConfigError):
        PPOSettings.load(None, eval_prompts=tmp_path / "e.jsonl", max_eval_drop=-1.0)


def test_run_config_carries_the_eval_settings(tmp_path):
    from services.trainer.config import TrainerConfig
    from services.trainer.ppo.runs import settings_from_proto, settings_to_proto
    from services.trainer.ppo.settings import PPOSettings

    prompts, evals = tmp_path / "p.jsonl", tmp_path / "e.jsonl"
    for path in (prompts, evals):
        path.write_text('{"prompt": "x"}\n')
    model = tmp_path / "model"
    model.mkdir()
    settings = PPOSettings.load(None, model=model, prompts=prompts, eval_prompts=evals,
                                eval_every=3,
                                eval_samples=5, eval_temperature=0.0, max_eval_drop=0.25)
    trainer = TrainerConfig.load(policy_addr=["127.0.0.1:1"], reward_addr=["127.0.0.1:2"],
                                 admin_token="t" * 32, allowed_roots=[str(tmp_path)],
                                 runs_dir=tmp_path / "runs")
    back = settings_from_proto(settings_to_proto(settings), trainer, "r1")
    assert (back.eval_prompts, back.eval_every, back.eval_samples, back.eval_temperature,
            back.max_eval_drop) == (evals, 3, 5, 0.0, 0.25)
    # unset optionals stay unset: no gate, the run's temperature
    plain = settings_from_proto(
        settings_to_proto(PPOSettings.load(None, model=model, prompts=prompts)), trainer, "r2")
    assert plain.eval_prompts is None and plain.max_eval_drop is None
    assert plain.eval_temperature is None


# ---------------------------------------------------------------------------- learner runs


def sample(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def eval_seed(seed: int) -> int:
    return seed * SEED_SCALE + SEED_OFFSET


def record_generate(app, seen: list, monkeypatch) -> None:
    """Records (seed, adapter served, the replica's active version) of every engine request."""
    engine = app.engine
    original = engine.generate

    def generate(prompt_ids, sampling, request_id, adapter, stream, on_submit=None):
        seen.append((sampling.seed, adapter.engine_name if adapter else "",
                     app.registry.active))
        return original(prompt_ids, sampling, request_id, adapter, stream, on_submit)

    monkeypatch.setattr(engine, "generate", generate)


@asynccontextmanager
async def eval_peers(model_dir: Path, data_dir: Path, seen: list, monkeypatch):
    """A FakeEngine policy whose engine requests are recorded, and a reward service scoring
    with `scripted_reward`."""
    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig
    from services.policy.fake_engine import FakeEngine
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    common = dict(grpc_port=0, metrics_port=0, drain_grace_seconds=1)
    pcfg = PolicyConfig.load(model=model_dir, data_dir=data_dir / "policy", max_model_len=512,
                             admin_token=ADMIN, keep_versions=8, **common)
    policy = await GrpcServer(pcfg, PolicyApp(pcfg, engine=FakeEngine(vocab_size=512))).start()
    record_generate(policy.app, seen, monkeypatch)
    rcfg = RewardConfig.load(scorer=[f"python:{Path(__file__)}:scripted_reward"], **common)
    reward = await GrpcServer(rcfg, RewardApp(rcfg)).start()
    try:
        yield f"127.0.0.1:{policy.port}", f"127.0.0.1:{reward.port}"
    finally:
        await reward.shutdown()
        await policy.shutdown()


@pytest.fixture
def eval_prompts(tmp_path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS))
    return path


async def adapters(addr: str, name: str) -> tuple[list[int], int]:
    """(versions kept, the active version) of `name` on a replica."""
    async with grpc.aio.insecure_channel(addr) as ch:
        listed = await policy_pb2_grpc.PolicyServiceStub(ch).ListAdapters(
            policy_pb2.ListAdaptersRequest(name=name))
    active = [a.adapter.version for a in listed.adapters if a.active]
    return sorted(a.adapter.version for a in listed.adapters), (active or [0])[0]


def eval_requests(seen: list, seed: int, name: str) -> dict[int, set]:
    """Eval requests (3 prompts, 2 per call: two seeds) by the version that served them:
    {version: {the replica's active version of `name` at the time, None = none}}."""
    by_version: dict[int, set] = {}
    for request_seed, served, active in seen:
        if request_seed in (eval_seed(seed), eval_seed(seed) + 1):
            assert served.startswith(f"{name}@v"), served
            version = int(served.split("@v")[1])
            now = active[1] if active is not None and active[0] == name else None
            by_version.setdefault(version, set()).add(now)
    return by_version


@pytest.mark.usefixtures("one_torch_thread")
async def test_a_version_whose_eval_reward_drops_is_not_promoted(
        tiny_model_dir, short_prompts, eval_prompts, tmp_path, monkeypatch):
    from services.trainer.ppo.metrics import TrainerMetrics

    monkeypatch.setenv(MODE, "high")
    out, seen = tmp_path / "dropping", []
    gauges = TrainerMetrics()
    refused_before = sample("rlhf_trainer_eval_refused_total")

    def on_metrics(metrics: dict) -> None:
        gauges.record(metrics)
        if metrics["step"] == 1:  # the versions after step 1 please the eval reward less
            os.environ[MODE] = "low"

    async with eval_peers(tiny_model_dir, tmp_path, seen, monkeypatch) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, steps=3,
                           eval_prompts=eval_prompts, eval_every=2, eval_samples=2,
                           max_eval_drop=0.1, checkpoint_every=10, keep_checkpoints=1)
        await Learner(run, Hooks(on_metrics=on_metrics)).run()
        kept, active = await adapters(policy, out.name)

    # v1 (the starting weights) was evaluated and promoted as the baseline; v2 (step 1) was not
    # evaluated, so not activated; v3 (step 2, an eval step) and v4 (the last) dropped.
    assert kept == [1, 2, 3, 4] and active == 1
    lines = rows(out)
    assert [r["adapter/version"] for r in lines] == [2, 3, 4]
    assert lines[0]["eval/promoted"] == 0 and "not evaluated" in lines[0]["eval/reason"]
    assert lines[0]["eval/baseline_version"] == 1 and lines[0]["eval/baseline_reward_mean"] == 1
    for line in lines[1:]:
        assert line["eval/version"] == line["adapter/version"]
        assert line["eval/reward_mean"] == 0.0 and line["eval/reward_std"] == 0.0
        assert line["eval/samples"] == len(EVAL_PROMPTS) * 2
        assert line["eval/promoted"] == 0
        assert "eval reward dropped" in line["eval/reason"]
        assert "promoted v1" in line["eval/reason"]
    # Each evaluation was pinned to its candidate while the replica served v1 to users.
    assert eval_requests(seen, run.seed, out.name) == {1: {None}, 3: {1}, 4: {1}}
    # The gauges carry the latest evaluation and the promoted one's.
    assert sample("rlhf_trainer_eval_version") == 4
    assert sample("rlhf_trainer_eval_reward_mean") == 0.0
    assert sample("rlhf_trainer_eval_promoted_version") == 1  # v1's figures came with step 1
    assert sample("rlhf_trainer_eval_refused_total") == refused_before + 2
    # Evaluated versions are checkpointed (the best by eval needs one) whatever checkpoint_every
    # says, step 1 is not; step 2 is the best by eval (the first), kept past keep_checkpoints.
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert checkpoint.best(out) == (out / "checkpoints" / "step-2", 0.0)
    # The promoted version's figures stay in the run folder.
    state = json.loads((out / "evaluation.json").read_text())
    assert state["version"] == 1 and state["reward_mean"] == 1.0


@pytest.mark.usefixtures("one_torch_thread")
async def test_versions_that_pass_their_eval_are_activated_and_resume_keeps_the_baseline(
        tiny_model_dir, short_prompts, eval_prompts, tmp_path, monkeypatch):
    monkeypatch.setenv(MODE, "high")
    out, seen = tmp_path / "passing", []
    async with eval_peers(tiny_model_dir, tmp_path, seen, monkeypatch) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, steps=2,
                           eval_prompts=eval_prompts, eval_every=2, eval_samples=1,
                           eval_temperature=0.0, max_eval_drop=0.0)
        await Learner(run).run()
        assert (await adapters(policy, out.name))[1] == 3  # v3 (step 2) passed: active
        lines = rows(out)
        assert lines[1]["eval/promoted"] == 1 and "within max_eval_drop" in lines[1]["eval/reason"]
        assert lines[1]["eval/reward_mean"] == 1.0 and lines[1]["eval/samples"] == 3
        # v3 was evaluated before it became active: the replica served v1 then.
        assert eval_requests(seen, run.seed, out.name)[3] == {1}
        assert checkpoint.best(out)[0].name == "step-2"

        # A resumed run compares against the promoted version of its checkpoint: the next
        # version drops and stays inactive.
        os.environ[MODE] = "low"
        await Learner(run.model_copy(update={"steps": 3})).run()
        kept, active = await adapters(policy, out.name)
    assert active == 3
    last = rows(out)[-1]
    assert last["step"] == 3 and last["eval/promoted"] == 0
    assert last["eval/baseline_version"] == 3 and "promoted v3" in last["eval/reason"]


@pytest.mark.usefixtures("one_torch_thread")
async def test_without_a_gate_eval_is_reported_and_every_version_is_activated(
        tiny_model_dir, short_prompts, eval_prompts, tmp_path, monkeypatch):
    monkeypatch.setenv(MODE, "low")
    out, seen = tmp_path / "report-only", []
    async with eval_peers(tiny_model_dir, tmp_path, seen, monkeypatch) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, steps=2,
                           eval_prompts=eval_prompts, eval_every=1)
        await Learner(run).run()
        assert (await adapters(policy, out.name))[1] == 3
    lines = rows(out)
    assert [r["eval/version"] for r in lines] == [2, 3]
    assert all(r["eval/promoted"] == 1 and r["eval/reward_mean"] == 0.0 for r in lines)


async def test_bad_eval_prompts_are_refused_before_the_run_starts(tiny_model_dir,
                                                                 short_prompts, tmp_path):
    from services.trainer.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    run = run_settings(tiny_model_dir, short_prompts, tmp_path / "x", "127.0.0.1:1",
                       "127.0.0.1:2", eval_prompts=bad)
    with pytest.raises(DataError, match="bad.jsonl:2"):
        Learner(run)


# ---------------------------------------------------------------------------- real vLLM


@pytest.mark.vllm
@pytest.mark.usefixtures("one_torch_thread")
async def test_vllm_serves_the_pinned_candidate_before_it_is_active(
        policy_lora, tiny_model_dir, short_prompts, eval_prompts, tmp_path, monkeypatch):
    from rlhf.plumbing.server import GrpcServer
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    monkeypatch.setenv(MODE, "high")
    seen: list = []
    record_generate(policy_lora.app, seen, monkeypatch)
    rcfg = RewardConfig.load(scorer=[f"python:{Path(__file__)}:scripted_reward"], grpc_port=0,
                             metrics_port=0, drain_grace_seconds=1)
    reward = await GrpcServer(rcfg, RewardApp(rcfg)).start()
    out = tmp_path / "eval-vllm"
    try:
        run = run_settings(tiny_model_dir, short_prompts, out, policy_lora.addr,
                           f"127.0.0.1:{reward.port}", steps=1, eval_prompts=eval_prompts,
                           eval_every=1, eval_samples=2, max_eval_drop=0.5, device="cpu")
        await Learner(run).run()
        kept, active = await adapters(policy_lora.addr, out.name)
    finally:
        await reward.shutdown()
    line = rows(out)[0]
    assert line["eval/version"] == 2 and line["eval/promoted"] == 1
    assert line["eval/reward_mean"] == 1.0 and line["eval/baseline_version"] == 1
    assert active == 2
    # vLLM generated the candidate's eval while v1 was the active version (pinned, staged).
    assert eval_requests(seen, run.seed, out.name)[2] == {1}
