"""The delivery check (services/trainer/ppo/delivery.py) and the learner's staged push: the
threshold's calibration on the tiny model (fp32 and bf16 pass, other weights fail), a replica
whose served digest is not the pushed one, a replica serving other weights under the pushed
version (real vLLM), and a replica that fails staging leaving no replica on the new version."""

from __future__ import annotations

import dataclasses
import json
import random
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch

from rlhf.clients import GaveUp
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import policy_pb2
from services.trainer.clients import Sample
from services.trainer.ppo import delivery
from services.trainer.ppo.actor_critic import ActorCritic, make_batch
from services.trainer.ppo.delivery import DeliveryCheck, NotDelivered
from services.trainer.ppo.learner import Hooks, Learner
from services.trainer.ppo.settings import DEFAULT_TARGET_MODULES
from tests.fixtures.policy_helpers import set_active, stub
from tests.policy.conftest import start_fake_policy, stop_fake_policy
from tests.trainer.helpers import run_settings

THRESHOLD = 0.1


def _sample(version: int, sha: str, logprobs=(-1.0, -2.0)) -> Sample:
    return Sample(0, [5, 6], [7, 8][: len(logprobs)], "", list(logprobs), version,
                  adapter_sha256=sha)


def test_mean_abs_diff_counts_only_known_tokens():
    learner = torch.tensor([[-1.0, -2.0, -9.0]])
    behaviour = torch.tensor([[-1.5, -1.0, 0.0]])
    known = torch.tensor([[1.0, 1.0, 0.0]])
    assert delivery.mean_abs_diff(learner, behaviour, known) == pytest.approx(0.75)


def test_a_served_digest_other_than_the_pushed_one_fails_the_version():
    check = DeliveryCheck(threshold=None, samples=4)
    check.pushed(3, "a" * 64, None)
    [verdict] = check.judge([_sample(3, "a" * 64), _sample(3, "b" * 64)], None)
    assert not verdict.ok and verdict.version == 3 and "bbbbbbbb" in verdict.reason
    assert delivery.OK_GAUGE._value.get() == 0.0
    check.pushed(4, "c" * 64, None)
    [verdict] = check.judge([_sample(4, "c" * 64)], None)
    assert verdict.ok and verdict.figures()["delivery/ok"] == 1.0
    assert check.judge([_sample(4, "c" * 64)], None) == []  # checked once per version


def test_first_rollouts_of_a_version_above_the_threshold_fail_it():
    check = DeliveryCheck(threshold=THRESHOLD, samples=2)
    check.pushed(1, "s" * 64, [torch.zeros(1)])
    asked = []

    def compare(samples, weights):
        asked.append((len(samples), weights))
        return 0.5

    [verdict] = check.judge([_sample(1, "s" * 64) for _ in range(5)], compare)
    assert asked and asked[0][0] == 2  # delivery_samples of them
    assert not verdict.ok and verdict.mismatch == 0.5 and "0.5 nats" in verdict.reason
    check.pushed(2, "t" * 64, [torch.zeros(1)])
    [verdict] = check.judge([_sample(2, "t" * 64)], lambda s, w: float("nan"))
    assert not verdict.ok  # a NaN is no pass


@pytest.fixture(scope="module")
def calibration(tiny_model_dir):
    """A 'trained' fp32 policy (random non-zero LoRA), rollouts with its own logprobs as the
    policy's, and the learner's mismatch on them: fp32, bf16, and with other weights."""
    torch.set_num_threads(1)

    def learner(dtype):
        torch.manual_seed(0)
        return ActorCritic(tiny_model_dir, lora_rank=4, lora_alpha=8,
                           target_modules=DEFAULT_TARGET_MODULES, with_critic=False,
                           compute_dtype=dtype)

    fp32 = learner("float32")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fp32.adapter_parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    trained = delivery.policy_weights(fp32)
    rng = random.Random(0)
    samples = [Sample(i, [rng.randrange(3, 500) for _ in range(6)],
                      [rng.randrange(3, 500) for _ in range(8)], "", [], 1) for i in range(8)]
    batch = make_batch([s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                       fp32.pad_id)
    with torch.no_grad():
        logp, _ = fp32.policy_logprobs(batch, entropy=False)
    for i, s in enumerate(samples):
        s.behaviour_logprobs = logp[i].tolist()
    other = [torch.randn(w.shape, generator=gen) * 0.3 for w in trained]
    figures = {
        "fp32": delivery.learner_logprobs(fp32, samples, trained),
        "bf16": delivery.learner_logprobs(learner("bfloat16"), samples, trained),
        "other": delivery.learner_logprobs(fp32, samples, other),
    }
    # The swap is undone: the learner's own weights are as they were.
    assert all(torch.equal(p, w) for p, w in zip(fp32.adapter_parameters("policy"), trained,
                                                 strict=True))
    return figures


def test_threshold_passes_fp32_and_bf16_and_fails_other_weights(calibration):
    assert calibration["fp32"] < 1e-4
    assert calibration["bf16"] < THRESHOLD  # ~0.02 on the tiny model
    assert calibration["other"] > 5 * THRESHOLD  # ~0.9


# ---------------------------------------------------------------------------- the learner


@asynccontextmanager
async def reward_server():
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    cfg = RewardConfig.load(scorer=["rule:length?target=20&unit=chars"], grpc_port=0,
                            metrics_port=0, drain_grace_seconds=1)
    server = await GrpcServer(cfg, RewardApp(cfg)).start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.shutdown()


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _on_commit(version: int, action):
    """Hooks whose adapter_pushed event for `version`'s activation runs `action()`."""
    def on_event(kind, message):
        if kind == "adapter_pushed" and message.startswith(f"v{version} active"):
            action()
    return Hooks(on_event=on_event)


async def test_learner_stages_commits_and_checks_the_digest(tiny_model_dir, short_prompts,
                                                            tmp_path, one_torch_thread):
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "p")
    try:
        async with reward_server() as reward:
            run = run_settings(tiny_model_dir, short_prompts, tmp_path / "good", policy.addr,
                               reward, steps=2)
            assert run.delivery_threshold == THRESHOLD  # the default
            learner = Learner(run)
            await learner.run()
            # Against the fake engine only digests are compared: its logprobs are no model's.
            assert learner.delivery.threshold is None
            rows = _rows(run.out)
            assert [r["delivery/ok"] for r in rows] == [1.0, 1.0]
            assert all(r["push/activated_replicas"] == 1 and r["push/missed_replicas"] == 0
                       for r in rows)
            kept = await stub(policy.channel).ListAdapters(
                policy_pb2.ListAdaptersRequest(name=run.adapter_name))
            assert [(a.adapter.version, a.active, a.staged) for a in kept.adapters][-1] == (
                3, True, False)

            # A replica whose record of v1 is another adapter's: its answers name that digest.
            bad = run_settings(tiny_model_dir, short_prompts, tmp_path / "bad", policy.addr,
                               reward, steps=2)

            def tamper():
                policy.app.registry.existing(bad.adapter_name, 1).sha256 = "f" * 64

            with pytest.raises(NotDelivered) as err:
                await Learner(bad, _on_commit(1, tamper)).run()
            assert "v1 was served with sha256 ffffffff" in str(err.value)
            [row] = _rows(bad.out)  # no step trained: only the refusal's line
            assert row["delivery/ok"] == 0.0 and row["step"] == 1
            assert not (bad.out / "checkpoints").exists() or not any(
                (bad.out / "checkpoints").iterdir())
            assert delivery.OK_GAUGE._value.get() == 0.0
    finally:
        await stop_fake_policy(policy)


async def test_a_replica_that_fails_staging_leaves_no_replica_on_the_new_version(
        tiny_model_dir, short_prompts, tmp_path, one_torch_thread):
    good = await start_fake_policy(tiny_model_dir, tmp_path / "a")
    small = await start_fake_policy(tiny_model_dir, tmp_path / "b", max_adapter_bytes=1024)
    try:
        async with reward_server() as reward:
            run = run_settings(tiny_model_dir, short_prompts, tmp_path / "run", good.addr,
                               reward).model_copy(update={"policy_addr": [good.addr, small.addr]})
            with pytest.raises(GaveUp) as err:
                await Learner(run).run()
            assert "no replica activates it" in str(err.value)
            for p in (good, small):
                listed = await stub(p.channel).ListAdapters(
                    policy_pb2.ListAdaptersRequest(name=run.adapter_name))
                assert list(listed.adapters) == [] and listed.active.base
            assert _rows(run.out) == []
    finally:
        await stop_fake_policy(good)
        await stop_fake_policy(small)


@pytest.mark.vllm
async def test_vllm_policy_delivers_as_trained_and_a_swapped_adapter_is_caught(
        policy_lora, tiny_adapters, short_prompts, tmp_path, one_torch_thread):
    """fp32 vLLM vs the fp32 learner passes; the same replica serving other weights under the
    pushed version (its digest unchanged, as when an adapter never reached the engine) fails."""
    try:
        async with reward_server() as reward:
            common = dict(steps=1, delivery_threshold=THRESHOLD, samples_per_prompt=2)
            run = run_settings(policy_lora.model_dir, short_prompts, tmp_path / "ok",
                               policy_lora.addr, reward, base_model_id="tiny", **common)
            await Learner(run).run()
            [row] = _rows(run.out)
            assert row["delivery/ok"] == 1.0 and row["delivery/mismatch"] < 1e-3

            swapped = run_settings(policy_lora.model_dir, short_prompts, tmp_path / "swapped",
                                   policy_lora.addr, reward, base_model_id="tiny", **common)
            registry = policy_lora.app.registry

            def swap():
                kept = registry.existing(swapped.adapter_name, 1)
                kept.handle = dataclasses.replace(kept.handle, engine_id=990_001,
                                                  path=tiny_adapters[0])

            with pytest.raises(NotDelivered) as err:
                await Learner(swapped, _on_commit(1, swap)).run()
            assert "delivery_threshold 0.1" in str(err.value)
            [row] = _rows(swapped.out)
            assert row["delivery/ok"] == 0.0 and row["delivery/mismatch"] > THRESHOLD
    finally:
        await set_active(policy_lora)  # the session server serves the base model again


def test_run_config_carries_staging_delivery_and_promotion(tmp_path):
    from rlhf.plumbing.errors import InvalidArgument
    from rlhf.v1 import trainer_pb2
    from services.trainer.config import TrainerConfig
    from services.trainer.ppo.runs import settings_from_proto, settings_to_proto

    cfg = TrainerConfig.load(data_dir=tmp_path, policy_addr=["10.0.0.1:50051"],
                             reward_addr=["10.0.0.2:50052"], prompts=tmp_path / "p.jsonl")
    run = settings_from_proto(trainer_pb2.RunConfig(
        stage_seconds=30, delivery_threshold=0.2, delivery_samples=4, promotion="canary",
        canary_wait_seconds=120.0), cfg, "r1")
    assert (run.stage_seconds, run.delivery_threshold, run.delivery_samples, run.promotion,
            run.canary_wait_seconds) == (30, 0.2, 4, "canary", 120.0)
    back = settings_to_proto(run)
    assert (back.stage_seconds, back.delivery_threshold, back.delivery_samples, back.promotion,
            back.canary_wait_seconds) == (30, 0.2, 4, "canary", 120.0)
    default = settings_from_proto(trainer_pb2.RunConfig(), cfg, "r2")
    assert (default.delivery_threshold, default.promotion) == (THRESHOLD, "immediate")
    digests_only = settings_from_proto(trainer_pb2.RunConfig(delivery_threshold=0.0), cfg, "r3")
    assert digests_only.delivery_threshold is None
    assert settings_to_proto(digests_only).delivery_threshold == 0.0
    for bad in (dict(promotion="later"), dict(delivery_threshold=-1.0),
                dict(canary_wait_seconds=0.0)):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            settings_from_proto(trainer_pb2.RunConfig(**bad), cfg, "r4")
