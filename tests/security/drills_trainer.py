"""Security drills for the trainer's control plane (issue 24 points 1, 2, 4, 8 and 10).

Real servers on 127.0.0.1: the trainer (TrainerApp on the shared GrpcServer), a policy over the
FakeEngine (its push checks, base model id and auth are the real ones) and a rule-scored reward.
Each drill is one attack or fault and the refusal it must meet:

- 24.1: TrainerService calls without the right token; a read token that tries to start a run;
  a trainer or policy with no admin token that tries to start; tokens leaking into logs, errors
  or the config's repr;
- 24.2: StartRun used as a file-system API (traversal and reserved names, paths outside the
  allowed roots or through a symlink, an oversized prompts file) and with numbers out of bounds;
- 24.4: a trainer on another base model pushing to the policy;
- 24.8: run after run through TrainerService: each run's learner (model, optimizer) is freed,
  every client channel closed, the process's RSS flat;
- 24.10: a policy or reward replica that answers with broken counts, lengths or values, and a
  reward mix whose weighted sum overflows.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import subprocess
import sys
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from rlhf.clients import CallFailed, RewardClient
from rlhf.formats import score_item
from rlhf.plumbing.auth import bearer_metadata
from rlhf.plumbing.config import ConfigError
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import (
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.trainer.app import TrainerApp
from services.trainer.clients import BadAnswer, Services
from services.trainer.config import TrainerConfig
from tests.fixtures.policy_helpers import ADMIN
from tests.fixtures.reward_helpers import start_reward
from tests.trainer.helpers import peers

TRAINER_ADMIN = "drill-trainer-admin-token-5f0c"
TRAINER_READ = "drill-trainer-read-token-91ab"
ADMIN_AUTH = bearer_metadata(TRAINER_ADMIN)
READ_AUTH = bearer_metadata(TRAINER_READ)
PROMPTS = ["the cat", "a dog", "hello", "once upon", "red apple", "big sky"]
# Peers nothing listens on: a run that got past StartRun's checks would wait for them.
NOWHERE = ["127.0.0.1:9"]


def trainer_prompts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def trainer_config(data_dir: Path, **overrides) -> TrainerConfig:
    values = dict(grpc_port=0, metrics_port=0, data_dir=data_dir, drain_grace_seconds=1,
                  policy_addr=NOWHERE, reward_addr=NOWHERE, admin_token=TRAINER_ADMIN,
                  read_token=TRAINER_READ, policy_admin_token=ADMIN,
                  prompts=trainer_prompts(data_dir / "prompts"))
    values.update(overrides)
    return TrainerConfig.load(**values)


@asynccontextmanager
async def trainer_server(cfg: TrainerConfig):
    """(server, TrainerService stub) for the block."""
    server = await GrpcServer(cfg, TrainerApp(cfg)).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, trainer_pb2_grpc.TrainerServiceStub(channel)
    finally:
        await server.shutdown()


async def trainer_refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def trainer_watch_refusal(stream) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    return err.value


# ------------------------------------------------------------------ 24.1: trainer auth


async def test_trainer_control_calls_need_the_admin_token(tmp_path):
    """24.1: StartRun and StopRun without a token, with a wrong one, or with the read token are
    refused before the servicer runs: no run is started, no run folder is made."""
    cfg = trainer_config(tmp_path / "data")
    start = trainer_pb2.StartRunRequest(run_id="attack", config=trainer_pb2.RunConfig(
        steps=1, learning_rate=1.0))
    refused = {
        "no token": ((), grpc.StatusCode.UNAUTHENTICATED),
        "wrong token": (bearer_metadata("guess"), grpc.StatusCode.PERMISSION_DENIED),
        "the read token": (READ_AUTH, grpc.StatusCode.PERMISSION_DENIED),
        "the policy's token": (bearer_metadata(ADMIN), grpc.StatusCode.PERMISSION_DENIED),
    }
    async with trainer_server(cfg) as (_, stub):
        for case, (metadata, code) in refused.items():
            err = await trainer_refusal(stub.StartRun(start, metadata=metadata, timeout=30))
            assert err.code() == code, (case, err.details())
            err = await trainer_refusal(stub.StopRun(
                trainer_pb2.StopRunRequest(run_id="attack"), metadata=metadata, timeout=30))
            assert err.code() == code, (case, err.details())
        err = await trainer_refusal(stub.GetRun(
            trainer_pb2.GetRunRequest(run_id="attack"), metadata=ADMIN_AUTH, timeout=30))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert not (cfg.resolved_runs_dir() / "attack").exists()


async def test_trainer_reads_need_the_read_or_admin_token(tmp_path):
    """24.1: GetRun and WatchRun without a token (or with a wrong one) are refused; the read
    token and the admin token both pass (the unknown run then answers NOT_FOUND)."""
    cfg = trainer_config(tmp_path / "data")
    get = trainer_pb2.GetRunRequest(run_id="r")
    watch = trainer_pb2.WatchRunRequest(run_id="r")
    async with trainer_server(cfg) as (_, stub):
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                               (bearer_metadata("guess"), grpc.StatusCode.PERMISSION_DENIED)):
            assert (await trainer_refusal(stub.GetRun(get, metadata=metadata,
                                                      timeout=30))).code() == code
            assert (await trainer_watch_refusal(stub.WatchRun(watch, metadata=metadata,
                                                              timeout=30))).code() == code
        for metadata in (READ_AUTH, ADMIN_AUTH):
            assert (await trainer_refusal(stub.GetRun(get, metadata=metadata, timeout=30))
                    ).code() == grpc.StatusCode.NOT_FOUND
            assert (await trainer_watch_refusal(stub.WatchRun(watch, metadata=metadata,
                                                              timeout=30))
                    ).code() == grpc.StatusCode.NOT_FOUND


def test_trainer_without_an_admin_token_refuses_to_start(tmp_path):
    """24.1: `rlhf serve trainer` with no admin token exits with a message naming the variable,
    and serves nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env["RLHF_HOME"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer", "--port", "0", "--metrics-port", "0"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "RLHF_TRAINER_ADMIN_TOKEN" in proc.stderr and "--insecure-no-auth" in proc.stderr
    assert "READY" not in proc.stdout and "Traceback" not in proc.stderr


def test_services_without_a_token_start_only_when_told_insecure(tmp_path, tiny_model_dir,
                                                                caplog):
    """24.1: the trainer and the policy (both have an admin surface) refuse to be built without
    an admin token; with insecure_no_auth they are, and say so in a warning."""
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig
    from services.policy.fake_engine import FakeEngine

    tcfg = trainer_config(tmp_path / "t", admin_token=None, read_token=None)
    pcfg = PolicyConfig.load(model=tiny_model_dir, data_dir=tmp_path / "p", grpc_port=0,
                             metrics_port=0)
    with pytest.raises(ConfigError, match="RLHF_TRAINER_ADMIN_TOKEN"):
        TrainerApp(tcfg)
    with pytest.raises(ConfigError, match="RLHF_POLICY_ADMIN_TOKEN"):
        PolicyApp(pcfg, engine=FakeEngine(vocab_size=512))
    with caplog.at_level(logging.WARNING):
        TrainerApp(tcfg.model_copy(update={"insecure_no_auth": True}))
        PolicyApp(pcfg.model_copy(update={"insecure_no_auth": True}),
                  engine=FakeEngine(vocab_size=512))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("INSECURE" in m and "trainer" in m for m in warned), warned
    assert any("INSECURE" in m and "policy" in m for m in warned), warned


async def test_trainer_tokens_never_leak(tmp_path, caplog):
    """24.1: tokens read from files are used, and appear in no log line, no error message a
    caller gets, and not in the config's repr; a mistyped token in a config file is reported
    without its value."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(TRAINER_ADMIN + "\n")
    token_file.chmod(0o600)
    cfg = trainer_config(tmp_path / "data", admin_token=None, admin_token_file=token_file)
    secrets = (TRAINER_ADMIN, TRAINER_READ, ADMIN)
    with caplog.at_level(logging.DEBUG):
        async with trainer_server(cfg) as (_, stub):
            details = []
            for metadata in ((), bearer_metadata("guess"), READ_AUTH):
                err = await trainer_refusal(stub.StartRun(
                    trainer_pb2.StartRunRequest(run_id="x"), metadata=metadata, timeout=30))
                details.append(err.details())
            # The admin token from the file is the one accepted; a bad request's error is clean.
            err = await trainer_refusal(stub.StartRun(trainer_pb2.StartRunRequest(
                run_id="x", config=trainer_pb2.RunConfig(
                    algorithm=trainer_pb2.ALGORITHM_GRPO, samples_per_prompt=1)),
                metadata=ADMIN_AUTH, timeout=30))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            details.append(err.details())
    text = "\n".join(details + [r.getMessage() for r in caplog.records] + [repr(cfg)])
    assert not [s for s in secrets if s in text]
    bad = tmp_path / "bad.yaml"
    bad.write_text("admin_token: [918273645546372819]\n")
    with pytest.raises(ConfigError) as err:
        TrainerConfig.load(bad)
    assert "admin_token" in str(err.value) and "918273645546372819" not in str(err.value)


# ------------------------------------------------------------------ 24.2: StartRun is not a FS API


def trainer_start(stub, run_id: str = "r", **config):
    return stub.StartRun(trainer_pb2.StartRunRequest(
        run_id=run_id, config=trainer_pb2.RunConfig(**config)), metadata=ADMIN_AUTH, timeout=60)


async def test_start_run_names_cannot_walk_the_file_system(tmp_path):
    """24.2: run ids and adapter names that are paths, traversal, hidden or reserved names
    (the policy's `state.json`, its `.incoming` staging folder) are INVALID_ARGUMENT naming the
    field; nothing is created outside (or inside) the runs folder."""
    cfg = trainer_config(tmp_path / "data")
    async with trainer_server(cfg) as (_, stub):
        for run_id in ("..", "../escape", "a/b", ".hidden", "state.json", "STATE.JSON", "latest"):
            err = await trainer_refusal(trainer_start(stub, run_id))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, run_id
            assert "run_id" in err.details(), err.details()
        for name in ("state.json", "..", "a/b", ".incoming", "x/../../y", "-rf"):
            err = await trainer_refusal(trainer_start(stub, "r", adapter_name=name))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "adapter_name" in err.details(), err.details()
    assert not (tmp_path / "escape").exists() and not (tmp_path / "data" / "escape").exists()
    assert not cfg.resolved_runs_dir().exists() or not any(cfg.resolved_runs_dir().iterdir())


async def test_start_run_paths_must_lie_under_the_allowed_roots(tmp_path, tiny_model_dir):
    """24.2: model, init_adapter and prompts outside the allowed roots, or inside through a
    symlink that leads out, or a prompts file larger than max_prompts_bytes, are
    INVALID_ARGUMENT naming the field."""
    outside = tmp_path / "outside"
    secret_prompts = trainer_prompts(outside)
    data = tmp_path / "data"
    (data / "links").mkdir(parents=True)
    (data / "links" / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    (data / "links" / "prompts.jsonl").symlink_to(secret_prompts)
    big = data / "big.jsonl"
    big.write_text(json.dumps({"prompt": "x" * 4096}) + "\n")
    cfg = trainer_config(data, max_prompts_bytes=1024)
    cases = [
        ("model", {"model": str(tiny_model_dir)}),
        ("model", {"model": "/etc"}),
        ("model", {"model": str(data / "links" / "model")}),
        ("model", {"model": "relative/model"}),
        ("init_adapter", {"init_adapter": str(outside)}),
        ("prompts_path", {"prompts_path": str(secret_prompts)}),
        ("prompts_path", {"prompts_path": "/etc/passwd"}),
        ("prompts_path", {"prompts_path": str(data / "links" / "prompts.jsonl")}),
        ("prompts_path", {"prompts_path": str(data / "prompts")}),  # a folder
        ("prompts_path", {"prompts_path": str(big)}),
    ]
    async with trainer_server(cfg) as (_, stub):
        for field, config in cases:
            err = await trainer_refusal(trainer_start(stub, "r", **config))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (config, err.details())
            assert field in err.details(), (config, err.details())
        err = await trainer_refusal(stub.GetRun(trainer_pb2.GetRunRequest(run_id="r"),
                                                metadata=ADMIN_AUTH, timeout=30))
        assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_start_run_numbers_are_bounded(tmp_path):
    """24.2: every number of a RunConfig has finite bounds: an infinite, NaN, huge or negative
    value is INVALID_ARGUMENT naming the field, never a run (a seed of 2**64 - 1 overflowed the
    policy's uint64 seed at the first Generate; learning_rate 1e6 wrecked the adapter)."""
    cfg = trainer_config(tmp_path / "data")
    cases = {
        "learning_rate": [math.inf, math.nan, 1e6],
        "temperature": [math.inf, 1e9],
        "seed": [2**64 - 1, 2**40],
        "lora_rank": [2**31],
        "steps": [2**32 - 1],
        "prompts_per_step": [10**6],
        "samples_per_prompt": [10**6],
        "max_new_tokens": [10**9],
        "ppo_epochs": [10**6],
        "minibatch_size": [10**9],
        "clip_range": [math.inf],
        "clip_range_value": [math.nan],
        "gamma": [math.nan],
        "lam": [math.inf],
        "kl_coef": [math.inf, 1e9],
        "target_kl": [math.inf, -1.0],
        "lora_alpha": [math.inf, 1e30],
        "max_staleness": [2**31],
        "checkpoint_every": [2**32 - 1],
        "push_quorum": [math.nan],
    }
    async with trainer_server(cfg) as (_, stub):
        for field, values in cases.items():
            for value in values:
                err = await trainer_refusal(trainer_start(stub, "r", **{field: value}))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, value)
                assert field in err.details(), (field, value, err.details())
        err = await trainer_refusal(trainer_start(stub, "r", target_modules=["(a+)+$"]))
        assert "target_modules" in err.details()
        err = await trainer_refusal(trainer_start(stub, "r", algorithm=99))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "algorithm" in err.details()


# ------------------------------------------------------------------ 24.4: the base-model check


async def trainer_wait_final(stub, run_id: str, timeout: float = 240) -> trainer_pb2.Run:
    async def wait():
        while True:
            run = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id),
                                     metadata=READ_AUTH, timeout=30)).run
            if run.state in (trainer_pb2.RUN_STATE_COMPLETED, trainer_pb2.RUN_STATE_FAILED,
                             trainer_pb2.RUN_STATE_STOPPED):
                return run
            await asyncio.sleep(0.2)

    return await asyncio.wait_for(wait(), timeout)


@pytest.mark.parametrize("folder", ["tiny-other", "tiny"], ids=["other name", "same name"])
async def test_a_trainer_on_another_base_model_is_refused_at_its_first_push(
        tiny_model_dir, tmp_path, folder):
    """24.4: a trainer whose model is another tiny model (another vocabulary, so the LoRA
    shapes on the attention projections still match) pushes its first adapter with its own
    model's id and fingerprint; the policy refuses it and the run fails saying which bases
    differ, also when the other model's folder has the policy's model's name (the id alone
    would pass: the fingerprint of config and tokenizer catches it)."""
    from rlhf.models.tiny import make_tiny_model

    data = tmp_path / "trainer"
    other = make_tiny_model(data / "models" / folder, seed=3, vocab_size=600)
    assert (other.name == tiny_model_dir.name) == (folder == "tiny")
    async with peers(tiny_model_dir, tmp_path / "peers") as (policy_addr, reward_addr):
        cfg = trainer_config(data, policy_addr=[policy_addr], reward_addr=[reward_addr],
                             model=tiny_model_dir)
        async with trainer_server(cfg) as (_, stub):
            await trainer_start(stub, "other-base", model=str(other), steps=1,
                                prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                                lora_rank=4)
            run = await trainer_wait_final(stub, "other-base")
        async with grpc.aio.insecure_channel(policy_addr) as channel:
            listed = await policy_pb2_grpc.PolicyServiceStub(channel).ListAdapters(
                policy_pb2.ListAdaptersRequest(name="policy"), timeout=30)
    assert run.state == trainer_pb2.RUN_STATE_FAILED, run.message
    assert "base model" in run.message, run.message
    if folder == "tiny-other":
        assert "tiny-other" in run.message, run.message
    else:
        assert "config and tokenizer differ" in run.message, run.message
    assert run.step == 0 and not listed.adapters


# ------------------------------------------------------------------ 24.8: no leaks


def trainer_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def test_runs_through_the_service_release_model_optimizer_and_channels(
        tiny_model_dir, tmp_path, monkeypatch):
    """24.8: 20 short runs in a row through TrainerService: when each ends its learner (model,
    optimizer) is freed, every policy and reward channel it opened is closed, and the trainer's
    RSS after the 20th run is within 150 MiB of what it was after the 5th."""
    from services.trainer.ppo import learner as learner_module

    # One entry per Services a run opened: whether both its clients were closed. (Holding the
    # Services themselves would keep their learners alive through the clients' hooks.)
    opened: list[dict] = []

    class Recorded(Services):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.drill_state = {"closed": False}
            opened.append(self.drill_state)

        async def close(self) -> None:
            await super().close()
            self.drill_state["closed"] = self.policy.closed and self.reward.closed

    monkeypatch.setattr(learner_module, "Services", Recorded)
    runs, learners, rss = 20, [], {}
    async with peers(tiny_model_dir, tmp_path / "peers") as (policy_addr, reward_addr):
        cfg = trainer_config(tmp_path / "trainer", policy_addr=[policy_addr],
                             reward_addr=[reward_addr], model=tiny_model_dir)
        async with trainer_server(cfg) as (server, stub):
            manager = server.app.manager
            for i in range(1, runs + 1):
                started = await trainer_start(
                    stub, f"leak-{i}", steps=1, prompts_per_step=2, samples_per_prompt=2,
                    max_new_tokens=4, ppo_epochs=1, minibatch_size=4, lora_rank=4,
                    adapter_name=f"leak-{i}")
                learners.append(weakref.ref(manager.runs[started.run.run_id].learner))
                run = await trainer_wait_final(stub, f"leak-{i}")
                assert run.state == trainer_pb2.RUN_STATE_COMPLETED, run.message
                if i in (5, runs):
                    gc.collect()
                    rss[i] = trainer_rss_mib()
    gc.collect()
    assert [ref for ref in learners if ref() is not None] == []
    assert len(opened) == runs
    assert all(state["closed"] for state in opened)
    print(f"trainer RSS after run 5: {rss[5]:.0f} MiB, after run {runs}: {rss[runs]:.0f} MiB")
    assert rss[runs] - rss[5] < 150, rss


# ------------------------------------------------------------------ 24.10: trust nothing from peers


class LyingPolicy(policy_pb2_grpc.PolicyServiceServicer):
    """Answers every Generate with `self.response`."""

    response = policy_pb2.GenerateResponse()

    async def Generate(self, request, context):
        return self.response


class LyingReward(reward_pb2_grpc.RewardServiceServicer):
    scores: list[float] = []

    async def Score(self, request, context):
        return reward_pb2.ScoreResponse(
            scores=[reward_pb2.ItemScore(score=s) for s in self.scores], request_id="lie-1")


def good_generate(prompts: int, n: int, tokens: int) -> policy_pb2.GenerateResponse:
    return policy_pb2.GenerateResponse(request_id="lie-1", results=[
        policy_pb2.PromptResult(
            prompt_index=i, prompt_token_ids=[5, 6],
            served_by=policy_pb2.ServedBy(adapter=policy_pb2.AdapterRef(name="drill", version=1)),
            completions=[policy_pb2.Completion(index=j, text="ab", token_ids=[7] * tokens,
                                               logprobs=[-0.5] * tokens) for j in range(n)])
        for i in range(prompts)])


@asynccontextmanager
async def lying_peers():
    server = grpc.aio.server()
    policy, reward = LyingPolicy(), LyingReward()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy, server)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(reward, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    addr = f"127.0.0.1:{port}"
    services = Services([addr], [addr], "drill", retry_max=1.0)
    try:
        yield addr, policy, reward, services
    finally:
        await services.close()
        await server.stop(0)


async def test_broken_generate_answers_fail_the_step_naming_the_replica():
    """24.10: a policy replica that answers with the wrong number of results or completions,
    token ids and logprobs of different lengths, more tokens than asked for, NaN or positive
    logprobs, or a version newer than the one pinned, is caught before the learner uses it:
    BadAnswer naming the replica's address and the call's request id."""
    records = [trainer_prompt_record(p) for p in ("a", "b")]
    lies = {}
    resp = good_generate(2, 2, 3)
    del resp.results[1]
    lies["a result missing"] = resp
    resp = good_generate(2, 2, 3)
    del resp.results[0].completions[1]
    lies["a completion missing"] = resp
    resp = good_generate(2, 2, 3)
    resp.results[1].completions[0].logprobs.pop()
    lies["logprobs shorter than the tokens"] = resp
    lies["more tokens than max_new_tokens"] = good_generate(2, 2, 5)
    resp = good_generate(2, 2, 3)
    resp.results[0].completions[0].logprobs[1] = math.nan
    lies["a NaN logprob"] = resp
    resp = good_generate(2, 2, 3)
    resp.results[0].completions[1].logprobs[0] = 3.0
    lies["a positive logprob"] = resp
    resp = good_generate(2, 2, 3)
    resp.results[1].prompt_index = 0
    lies["a repeated prompt index"] = resp
    resp = good_generate(2, 2, 3)
    resp.results[0].served_by.adapter.version = 9
    lies["a version newer than pinned"] = resp
    async with lying_peers() as (addr, policy, _, services):
        policy.response = good_generate(2, 2, 3)
        samples = await services.generate(records, 2, 4, 1.0, 0, 1)
        assert len(samples) == 4  # the honest answer passes
        for case, lie in lies.items():
            policy.response = lie
            with pytest.raises(BadAnswer) as err:
                await services.generate(records, 2, 4, 1.0, 0, 1)
            assert addr in str(err.value) and "lie-1" in str(err.value), (case, err.value)


async def test_broken_score_answers_fail_the_step_naming_the_replica():
    """24.10: a reward replica that answers with fewer scores than items, or a NaN or infinite
    score, is caught: BadAnswer naming its address."""
    from services.trainer.clients import Sample

    records = [trainer_prompt_record("a")]
    samples = [Sample(0, [1], [2], "x", [-0.1], 1), Sample(0, [1], [3], "y", [-0.2], 1)]
    async with lying_peers() as (addr, _, reward, services):
        reward.scores = [0.5, 0.25]
        assert await services.score(records, samples) == [0.5, 0.25]
        for lie in ([0.5], [0.5, math.nan], [math.inf, 0.0], [0.1, 0.2, 0.3]):
            reward.scores = lie
            with pytest.raises(BadAnswer) as err:
                await services.score(records, samples)
            assert addr in str(err.value), (lie, err.value)


def trainer_prompt_record(text: str):
    from services.trainer.data import PromptRecord

    return PromptRecord(prompt=text)


async def test_the_reward_mix_cannot_overflow_to_inf(tmp_path):
    """24.10: finite scores times finite weights that sum past the float range fail the Score
    call with INTERNAL naming the overflow (never an inf score for the trainer); a weight that
    is itself out of range (`1e999*` reads as inf) stops the service at start-up."""
    from rlhf.plumbing.errors import FailedPrecondition

    module = tmp_path / "huge_reward.py"
    module.write_text("def huge(prompts, completions, **kwargs):\n"
                      "    return [1e308 for _ in completions]\n")
    reward = await start_reward([f"10*python:{module}:huge"])
    try:
        async with RewardClient(f"127.0.0.1:{reward.server.port}") as client:
            with pytest.raises(CallFailed) as err:
                await client.score([score_item("hello", prompt="hi")])
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert "overflows" in err.value.details
    finally:
        await reward.close()
    with pytest.raises(FailedPrecondition, match="weight"):
        await start_reward(["1e999*rule:length?target=5&unit=chars"])
