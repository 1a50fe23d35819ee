"""Gates in the learner and the checkpoints that are never pruned: the pure gate checks, settings
that refuse inf/NaN, the last_good and best pointers, and learner runs against a real policy
servicer (FakeEngine) and a real reward service whose scores overflow the learner's float32 or
whose learning rate makes an oversized step: rolled back, never pushed, recorded, stopped or
skipped; resume from last_good."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from rlhf.plumbing.config import ConfigError
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import policy_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.trainer.ppo import checkpoint, gates
from services.trainer.ppo.learner import Learner
from tests.fixtures.policy_helpers import ADMIN
from tests.trainer.helpers import peers, run_settings

# float32's largest value: a finite score the reward service sends, whose square (the value
# loss) and whitening overflow the learner's float32 to inf, and its losses to NaN.
HUGE = 3.0e38


def scorer_file(tmp_path: Path, flag: Path | None = None) -> str:
    """A reward spec scoring HUGE (while `flag` exists, when one is given), else the length."""
    path = tmp_path / "huge_reward.py"
    check = "True" if flag is None else f"Path({str(flag)!r}).exists()"
    path.write_text(
        "from pathlib import Path\n\n\n"
        "def score(prompts, completions, **kwargs):\n"
        f"    if {check}:\n"
        f"        return [{HUGE!r} for _ in completions]\n"
        "    return [len(c) / 10 for c in completions]\n")
    return f"python:{path}:score"


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


async def versions_on_policy(addr: str, name: str) -> list[int]:
    async with grpc.aio.insecure_channel(addr) as ch:
        listed = await policy_pb2_grpc.PolicyServiceStub(ch).ListAdapters(
            policy_pb2.ListAdaptersRequest(name=name))
    return sorted(a.adapter.version for a in listed.adapters)


# ------------------------------------------------------------------ the pure gates


def test_judge_passes_a_finite_bounded_step_and_names_each_failed_gate():
    before = [torch.ones(4, 4), torch.zeros(4, 4)]
    after = [torch.ones(4, 4), torch.full((4, 4), 0.1)]
    weights = [("a", after[0]), ("b", after[1])]
    figures = {"loss/policy": 0.3, "loss/value": 1.2}
    ok = gates.judge(figures, [0.5, 2.0], weights, before, after, max_update_norm=1.0)
    assert ok.passed and ok.reason == "" and ok.grad_norm == 2.0
    # ||0.1 * ones(4,4)|| / ||ones(4,4)|| = 0.4 / 4
    assert ok.update_norm == pytest.approx(0.1)

    cases = {
        "non-finite loss: loss/value=nan": dict(figures={**figures, "loss/value": math.nan}),
        "non-finite gradient norm before clipping (inf)": dict(grad_norms=[0.5, math.inf]),
        "non-finite trainable weight b": dict(
            weights=[weights[0], ("b", torch.tensor([math.nan]))]),
        "update too large: relative L2 change of the policy's weights 0.1 > max_update_norm "
        "0.05": dict(max_update_norm=0.05),
    }
    for reason, change in cases.items():
        args = dict(figures=figures, grad_norms=[0.5, 2.0], weights=weights,
                    policy_before=before, policy_after=after, max_update_norm=1.0) | change
        verdict = gates.judge(**args)
        assert not verdict.passed and verdict.reason == reason, (reason, verdict)


def test_update_norm_is_the_relative_l2_change():
    before = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]  # norm 5
    after = [torch.tensor([3.0, 3.0]), torch.tensor([0.0])]   # change (0, 3, -4): norm 5
    assert gates.update_norm(before, after) == pytest.approx(1.0)
    assert gates.update_norm(before, before) == 0.0
    # Weights of norm zero: the change is measured against 1.
    assert gates.update_norm([torch.zeros(2)], [torch.tensor([0.0, 2.0])]) == pytest.approx(2.0)


def test_a_snapshot_rolls_back_weights_and_optimizer_state():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)

    def step(scale: float) -> None:
        (layer(torch.ones(1, 3)).sum() * scale).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(1.0)
    snap = gates.Snapshot(list(layer.parameters()), optimizer)
    reference = {k: v.clone() for k, v in layer.state_dict().items()}
    step(1e30)  # a wild step moves the weights and Adam's moments
    assert not torch.equal(layer.weight, reference["weight"])
    snap.restore(optimizer)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in reference.items())
    # The next step is the one the model would have taken had the wild step never happened.
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(reference)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.1)
    twin_opt.load_state_dict(snap.optimizer_state)
    step(1.0)
    twin(torch.ones(1, 3)).sum().backward()
    twin_opt.step()
    assert torch.allclose(layer.weight, twin.weight) and torch.allclose(layer.bias, twin.bias)


def test_a_snapshot_of_a_fresh_optimizer_restores_an_empty_state():
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    snap = gates.Snapshot(list(layer.parameters()), optimizer)
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    snap.restore(optimizer)
    assert optimizer.state_dict()["state"] == {}


def test_finite_only_keeps_a_metrics_line_valid_json():
    line = gates.finite_only({"step": 3, "loss/policy": math.nan, "kl/ref": math.inf,
                              "reward/mean": 1.0, "gate/reason": "non-finite loss"})
    assert line == {"step": 3, "reward/mean": 1.0, "gate/reason": "non-finite loss"}


# ------------------------------------------------------------------ settings


def test_every_stage_refuses_inf_and_nan_settings(tmp_path):
    from services.trainer.dpo.settings import DPOSettings
    from services.trainer.loop.settings import LoopSettings
    from services.trainer.ppo.settings import PPOSettings
    from services.trainer.rm.settings import RMSettings
    from services.trainer.sft.settings import SFTSettings

    cases = [(PPOSettings, "learning_rate"), (PPOSettings, "max_update_norm"),
             (SFTSettings, "lr"), (SFTSettings, "max_grad_norm"), (RMSettings, "lr"),
             (RMSettings, "head_lr"), (DPOSettings, "lr"), (DPOSettings, "max_grad_norm"),
             (LoopSettings, "lr")]
    for cls, name in cases:
        for value in (math.inf, math.nan):
            with pytest.raises(ConfigError) as err:
                cls.load(None, **{name: value})
            assert f"{name}: Input should be a finite number" in str(err.value), (cls, name)


def test_gate_settings_and_their_bounds():
    from services.trainer.ppo.settings import PPOSettings

    s = PPOSettings()
    assert (s.max_update_norm, s.on_bad_step, s.max_bad_steps, s.resume_from) == (
        2.0, "stop", 3, "last")
    assert PPOSettings(resume_from="/runs/a/checkpoints/step-3").resume_point() == Path(
        "/runs/a/checkpoints/step-3")
    assert PPOSettings(resume_from="last_good").resume_point() == "last_good"
    for bad in ({"on_bad_step": "ignore"}, {"max_bad_steps": 0}, {"max_update_norm": 0},
                {"resume_from": ""}):
        with pytest.raises(ConfigError):
            PPOSettings.load(None, **bad)


# ------------------------------------------------------------------ last_good and best


class TinyModel(torch.nn.Module):
    """What checkpoint.save needs of the learner's model: trainable tensors and a peft-like
    adapter folder."""

    def __init__(self):
        super().__init__()
        self.lora = torch.nn.Parameter(torch.randn(2, 2))

    def save_policy_adapter(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text("{}")
        save_file({"lora": self.lora.detach().clone()}, out / "adapter_model.safetensors")
        return out


def save_steps(out: Path, steps, keep: int, model=None) -> TinyModel:
    model = model or TinyModel()
    optimizer = torch.optim.AdamW(model.parameters())
    for k in steps:
        with torch.no_grad():
            model.lora.fill_(float(k))
        checkpoint.save(out, k, model=model, optimizer=optimizer, keep=keep,
                        state={"version": k + 1, "cursor": {}, "kl_ctl": {}})
    return model


def test_pruning_keeps_the_last_good_and_the_best(tmp_path):
    out = tmp_path / "run"
    save_steps(out, [1, 2], keep=1)
    assert saved_steps(out) == [2]
    assert checkpoint.mark_last_good(out, out / "checkpoints" / "step-2")
    save_steps(out, [3], keep=1)
    assert checkpoint.mark_best(out, 3, 0.7)
    assert not checkpoint.mark_best(out, 3 + 10, 0.9)  # no such checkpoint
    save_steps(out, [4, 5, 6], keep=1)
    assert saved_steps(out) == [2, 3, 6]
    assert checkpoint.last_good(out).name == "step-2"
    assert checkpoint.best(out) == (out / "checkpoints" / "step-3", 0.7)
    # A lower eval score does not replace the best; a higher one does, and the old best is then
    # pruned by the next save.
    assert not checkpoint.mark_best(out, 6, 0.5)
    assert checkpoint.mark_best(out, 6, 0.8)
    save_steps(out, [7], keep=1)
    assert saved_steps(out) == [2, 6, 7]
    # A checkpoint of another run is never named last_good.
    other = tmp_path / "other"
    save_steps(other, [1], keep=1)
    assert not checkpoint.mark_last_good(out, other / "checkpoints" / "step-1")
    assert checkpoint.last_good(out).name == "step-2"


def test_resume_from_a_missing_or_bad_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="has no last_good checkpoint"):
        checkpoint.resume_folder(out, "last_good")
    with pytest.raises(ConfigError, match="has no best checkpoint"):
        checkpoint.resume_folder(out, "best")
    assert checkpoint.resume_folder(out, "last") is None  # a fresh start
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        checkpoint.resume_folder(out, tmp_path)
    save_steps(out, [1], keep=1)
    folder = out / "checkpoints" / "step-1"
    (folder / "trainable.pt").write_bytes(b"torn")
    with pytest.raises(ConfigError, match="does not read back whole"):
        checkpoint.resume_folder(out, folder)


def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path):
    out = tmp_path / "run"
    save_steps(out, [1, 2, 3], keep=5)
    checkpoint.mark_last_good(out, out / "checkpoints" / "step-1")
    checkpoint.mark_best(out, 3, 1.0)
    moved = checkpoint.abandon_after(out, out / "checkpoints" / "step-1")
    assert [p.name for p in moved] == ["step-3", "step-2"]
    assert all(p.is_dir() and p.parent.parent.name == "abandoned" for p in moved)
    assert saved_steps(out) == [1]
    assert checkpoint.latest(out).name == "step-1"
    assert checkpoint.best(out) == (None, None)  # it named an abandoned checkpoint
    assert checkpoint.last_good(out).name == "step-1"


# ------------------------------------------------------------------ learner runs


async def test_a_nan_step_is_rolled_back_never_pushed_and_stops_the_run(tiny_model_dir,
                                                                        short_prompts, tmp_path):
    out = tmp_path / "nan"
    async with peers(tiny_model_dir, tmp_path, scorer=scorer_file(tmp_path)) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, algo="ppo",
                           steps=5, max_bad_steps=2)
        learner = Learner(run)
        initial = [p.detach().clone() for p in learner_params(learner, build=True)]
        with pytest.raises(gates.GateFailed) as err:
            await learner.run()
        assert "step 2 failed its gates (non-finite loss" in str(err.value)
        assert "2 failed step(s) in a row (max_bad_steps 2)" in str(err.value)
        # Only the starting adapter reached the policy; no checkpoint was written.
        assert await versions_on_policy(policy, out.name) == [1]
        assert saved_steps(out) == [] and checkpoint.last_good(out) is None
        lines = rows(out)
        assert [(r["step"], r["gate/failed"], r["adapter/version"]) for r in lines] == [
            (1, 1.0, 1), (2, 1.0, 1)]
        assert all(r["gate/reason"].startswith("non-finite loss") for r in lines)
        assert all(r["reward/mean"] == pytest.approx(HUGE, rel=1e-6) for r in lines)
        # The weights are those before the bad steps.
        assert all(torch.equal(a, b) for a, b in zip(initial, learner_params(learner),
                                                     strict=True))


def learner_params(learner: Learner, build: bool = False) -> list[torch.Tensor]:
    if build:
        learner._build()
    return [p.detach() for p in learner.model.trainable_parameters()]


async def test_an_oversized_step_fails_its_gate_and_is_skipped_under_skip(
        tiny_model_dir, short_prompts, tmp_path):
    out = tmp_path / "big"
    async with peers(tiny_model_dir, tmp_path) as (policy, reward):
        # A sane step passes its gates, with its update size recorded.
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, algo="grpo",
                           steps=1, keep_checkpoints=1)
        await Learner(run).run()
        good = rows(out)[0]
        assert good["gate/failed"] == 0.0 and 0 < good["gate/update_norm"] < 1.0
        assert "gate/reason" not in good
        assert checkpoint.last_good(out).name == "step-1"
        # lr 1.0 moves every LoRA B weight by about 1 in Adam's first step: far beyond its size.
        wild = run.model_copy(update={"steps": 3, "learning_rate": 1.0, "on_bad_step": "skip"})
        learner = Learner(wild)
        await learner.run()
        lines = rows(out)
        assert [(r["step"], r["gate/failed"]) for r in lines] == [(1, 0.0), (2, 1.0), (3, 1.0)]
        for r in lines[1:]:
            assert r["gate/reason"].startswith("update too large: relative L2 change")
            assert r["gate/update_norm"] > 1.0 and r["adapter/version"] == good["adapter/version"]
        # Nothing new reached the policy; the run ended normally, last_good is still step 1
        # although keep_checkpoints is 1 and the run saved its position at step 3.
        assert await versions_on_policy(policy, out.name) == [1, good["adapter/version"]]
        assert learner.step == 3 and learner.version == good["adapter/version"]
        assert saved_steps(out) == [1, 3]
        assert checkpoint.last_good(out).name == "step-1"


async def test_last_good_survives_pruning_and_resuming_from_it_gives_its_weights(
        tiny_model_dir, short_prompts, tmp_path):
    out = tmp_path / "lastgood"
    flag = tmp_path / "huge-now"
    async with peers(tiny_model_dir, tmp_path, scorer=scorer_file(tmp_path, flag)) as (
            policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, algo="ppo",
                           steps=2, keep_checkpoints=1)
        await Learner(run).run()
        assert saved_steps(out) == [2] and checkpoint.last_good(out).name == "step-2"
        good = torch.load(out / "checkpoints" / "step-2" / "trainable.pt", weights_only=True)

        flag.touch()  # the reward now overflows: steps 3 and 4 fail their gates
        await Learner(run.model_copy(update={"steps": 4, "on_bad_step": "skip"})).run()
        assert [r["gate/failed"] for r in rows(out)] == [0.0, 0.0, 1.0, 1.0]
        # keep_checkpoints 1 kept the newest (step 4, the run's position) and last_good.
        assert saved_steps(out) == [2, 4]
        flag.unlink()

        back = Learner(run.model_copy(update={"steps": 3, "resume_from": "last_good"}))
        back._build()
        folder = back._resume()
        assert folder == out / "checkpoints" / "step-2" and back.step == 2
        named = dict(back.model.named_parameters())
        assert all(torch.equal(named[name], value) for name, value in good.items())
        # Step 4 belonged to the abandoned branch; metrics.jsonl ends at step 2 again.
        assert saved_steps(out) == [2]
        assert [r["step"] for r in rows(out)] == [1, 2]
        assert (out / "checkpoints" / "abandoned").is_dir()

        # resume_from last_good on a folder without one is refused before anything is built.
        with pytest.raises(ConfigError, match="no last_good checkpoint"):
            Learner(run.model_copy(update={"out": tmp_path / "fresh",
                                           "resume_from": "last_good"}))


async def test_start_run_and_get_run_report_the_failed_gate(tiny_model_dir, short_prompts,
                                                            tmp_path):
    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    async with peers(tiny_model_dir, tmp_path, scorer=scorer_file(tmp_path)) as (policy, reward):
        cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=tmp_path / "trainer",
                                 model=tiny_model_dir, prompts=short_prompts,
                                 policy_addr=[policy], reward_addr=[reward],
                                 policy_admin_token=ADMIN, drain_grace_seconds=1,
                                 insecure_no_auth=True)
        server = await GrpcServer(cfg, TrainerApp(cfg)).start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = trainer_pb2_grpc.TrainerServiceStub(ch)
                started = await stub.StartRun(trainer_pb2.StartRunRequest(
                    run_id="gated", config=trainer_pb2.RunConfig(
                        steps=3, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                        ppo_epochs=1, minibatch_size=4, lora_rank=4, adapter_name="gated",
                        max_bad_steps=1, on_bad_step="stop", max_update_norm=3.0)))
                assert started.run.config.max_bad_steps == 1
                assert started.run.config.max_update_norm == 3.0
                run = started.run
                for _ in range(600):
                    run = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id="gated"))).run
                    if run.state == trainer_pb2.RUN_STATE_FAILED:
                        break
                    await asyncio.sleep(0.2)
                assert run.state == trainer_pb2.RUN_STATE_FAILED
                assert run.message.startswith("GateFailed: step 1 failed its gates (non-finite")
                assert run.adapter_version == 1 and run.step == 1

                # A resume point the run does not have is refused at StartRun.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.StartRun(trainer_pb2.StartRunRequest(
                        run_id="gated", config=trainer_pb2.RunConfig(resume_from="best")))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "has no best checkpoint" in err.value.details()
        finally:
            await server.shutdown()
        assert await versions_on_policy(policy, "gated") == [1]


async def test_train_ppo_exits_non_zero_naming_the_failed_gate(tiny_model_dir, short_prompts,
                                                               tmp_path):
    out = tmp_path / "cli"
    async with peers(tiny_model_dir, tmp_path, scorer=scorer_file(tmp_path)) as (policy, reward):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rlhf.cli", "train", "ppo", "--model", str(tiny_model_dir),
            "--prompts", str(short_prompts), "--out", str(out), "--policy-addr", policy,
            "--reward-addr", reward, "--admin-token", ADMIN, "--steps", "3",
            "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4",
            "--max-bad-steps", "1", "--device", "cpu",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 1, stderr.decode()[-2000:]
    assert "run failed: step 1 failed its gates (non-finite loss" in stderr.decode()
    assert "Traceback" not in stderr.decode()
