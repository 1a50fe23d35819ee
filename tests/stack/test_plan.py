"""The plan of `rlhf up` without starting anything: ports, peer addresses, per-service config from
stack.yaml, the files it writes, and the errors that name what is missing."""

from __future__ import annotations

import itertools
import shutil
import stat
from pathlib import Path

import click
import pytest
import yaml

from rlhf.plumbing.command import config_from_flags, config_options
from rlhf.plumbing.config import ConfigError
from rlhf.stack.plan import (
    DEFAULT_PROMPTS,
    DEFAULT_SCORERS,
    PlanError,
    UpOptions,
    build_plan,
    merge_sections,
    peer_flags,
)
from rlhf.stack.rundir import admin_token, prepare, read_stack_config, write_plan


def _plan(tmp_path: Path, sections: dict | None = None, **opts):
    ports = itertools.count(41000)
    options = UpOptions(run_dir=tmp_path / "run", **opts)
    return build_plan(options, sections or {}, tmp_path / "model", "tok", tmp_path / "ipc",
                      port=lambda: next(ports), python="python", trainer_token="ttok")


def _flag_values(argv, flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def test_every_port_is_distinct_and_on_the_command_line(tmp_path):
    plan = _plan(tmp_path, policy_replicas=2, gateway_port=8088)
    names = [s.name for s in plan.services]
    assert names == ["policy-0", "policy-1", "reward", "trainer", "gateway"]
    ports = [p for s in plan.services for p in (s.port, s.metrics_port) if p is not None]
    assert len(ports) == len(set(ports)) == 9
    for svc in plan.services:
        assert _flag_values(svc.argv, "--port") == [str(svc.port)]
        assert svc.argv[:3] == ("python", "-m", "gateway" if svc.kind == "gateway"
                                else f"services.{svc.kind}")
        if svc.kind != "gateway":
            assert _flag_values(svc.argv, "--metrics-port") == [str(svc.metrics_port)]
            assert _flag_values(svc.argv, "--data-dir") == [str(plan.run_dir / "data" / svc.name)]
        assert svc.log == plan.run_dir / "logs" / f"{svc.name}.log"
    assert plan.of_kind("gateway")[0].port == 8088
    assert plan.of_kind("gateway")[0].url == "http://127.0.0.1:8088"


def test_consumers_get_every_policy_replica_and_the_reward(tmp_path):
    plan = _plan(tmp_path, policy_replicas=3)
    policies = [s.addr for s in plan.of_kind("policy")]
    reward = plan.of_kind("reward")[0].addr
    for kind in ("trainer", "gateway"):
        argv = plan.of_kind(kind)[0].argv
        assert _flag_values(argv, "--policy-addr") == policies
        assert _flag_values(argv, "--reward-addr") == [reward]
    # Each replica its own vLLM IPC folder and data dir; the admin token for policy and trainer.
    ipc = [s.ipc_dir for s in plan.of_kind("policy")]
    assert ipc == [tmp_path / "ipc" / f"policy-{i}" for i in range(3)]
    assert all(d in plan.dirs for d in ipc)
    assert {s.env["RLHF_POLICY_ADMIN_TOKEN"] for s in plan.of_kind("policy")} == {"tok"}
    assert plan.of_kind("trainer")[0].env["RLHF_TRAINER_POLICY_ADMIN_TOKEN"] == "tok"
    assert plan.of_kind("trainer")[0].env["RLHF_TRAINER_ADMIN_TOKEN"] == "ttok"
    assert "RLHF_POLICY_ADMIN_TOKEN" not in plan.of_kind("gateway")[0].env


def test_skipped_kinds_are_not_planned(tmp_path):
    plan = _plan(tmp_path, skip=["trainer", "gateway"])
    assert [s.kind for s in plan.services] == ["policy", "reward"]
    assert plan.files == {}  # no default prompts without a trainer


def test_sections_become_config_files_and_flags_keep_the_stack_keys(tmp_path):
    sections = merge_sections(
        {"policy": {"adapter_mode": "merged", "max_model_len": 1024}},
        {"policy": {"max_model_len": 512}, "gateway": {"default_max_tokens": 8}},
    )
    assert sections == {"policy": {"adapter_mode": "merged", "max_model_len": 512},
                        "gateway": {"default_max_tokens": 8}}
    plan = _plan(tmp_path, sections, extra_env={"A": "1"})
    by_kind = {s.kind: s for s in plan.services}
    for kind in ("policy", "gateway"):
        (path,) = _flag_values(by_kind[kind].argv, "--config")
        assert yaml.safe_load(plan.files[Path(path)]) == sections[kind]
    for kind in ("reward", "trainer"):  # no section: no config file
        assert "--config" not in by_kind[kind].argv
    assert all(s.env["A"] == "1" and s.env["PYTHONUNBUFFERED"] == "1" for s in plan.services)


def test_default_scorers_and_prompts_only_when_none_is_named(tmp_path):
    plan = _plan(tmp_path)
    reward, trainer = plan.of_kind("reward")[0], plan.of_kind("trainer")[0]
    assert [a for a in reward.argv if a.startswith("--scorer=")] == [
        f"--scorer={s}" for s in DEFAULT_SCORERS]
    (prompts,) = _flag_values(trainer.argv, "--prompts")
    assert plan.files[Path(prompts)].count("\n") == len(DEFAULT_PROMPTS)

    named = _plan(tmp_path, {"reward": {"scorer": ["rule:length"]},
                             "trainer": {"prompts": "/p.jsonl"}})
    assert not [a for a in named.of_kind("reward")[0].argv if a.startswith("--scorer")]
    assert "--prompts" not in named.of_kind("trainer")[0].argv
    assert not [p for p in named.files if p.name == "prompts.jsonl"]

    given = _plan(tmp_path, scorers=["rule:repetition"], prompts=Path("/mine.jsonl"))
    assert [a for a in given.of_kind("reward")[0].argv if a.startswith("--scorer")] == [
        "--scorer=rule:repetition"]
    assert _flag_values(given.of_kind("trainer")[0].argv, "--prompts") == ["/mine.jsonl"]


def test_a_peer_the_plan_cannot_fill_is_an_error_naming_the_key():
    with pytest.raises(PlanError, match="trainer needs reward_addr"):
        peer_flags("trainer", {"policy_addr": ["127.0.0.1:1"], "reward_addr": []})
    with pytest.raises(PlanError, match="gateway needs policy_addr"):
        peer_flags("gateway", {"reward_addr": ["127.0.0.1:2"]})
    assert peer_flags("reward", {}) == []  # the reward needs no peer


def _resolved(config_cls, argv):
    """The config a service builds from its planned command line, as `rlhf serve` does."""
    params, fields = config_options(config_cls)
    ctx = click.Command("service", params=params).make_context("service", list(argv[3:]))
    values = dict(ctx.params)
    return config_from_flags(config_cls, values.pop("config_file"), fields, values)


def test_a_stack_yaml_cannot_take_a_peer_away(tmp_path, monkeypatch):
    """A section that empties or moves a peer address (or a port) still leaves each consumer
    with the stack's own peers and port: the planned flags beat the service's config file."""
    from gateway.config import GatewayConfig
    from services.trainer.config import TrainerConfig

    for var in ("RLHF_TRAINER_POLICY_ADDR", "RLHF_GATEWAY_REWARD_ADDR"):
        monkeypatch.delenv(var, raising=False)
    sections = {"trainer": {"policy_addr": [], "reward_addr": ["10.0.0.1:9"], "grpc_port": 1},
                "gateway": {"reward_addr": [], "policy_addr": ["10.0.0.1:9"], "http_port": 2}}
    plan = _plan(tmp_path, sections, policy_replicas=2)
    write_plan(plan)
    policies = [s.addr for s in plan.of_kind("policy")]
    reward = [plan.of_kind("reward")[0].addr]
    trainer = _resolved(TrainerConfig, plan.of_kind("trainer")[0].argv)
    gateway = _resolved(GatewayConfig, plan.of_kind("gateway")[0].argv)
    for config in (trainer, gateway):
        assert config.policy_addr == policies
        assert config.reward_addr == reward
    assert trainer.grpc_port == plan.of_kind("trainer")[0].port
    assert gateway.http_port == plan.of_kind("gateway")[0].port


def test_stack_config_sections_are_checked(tmp_path):
    bad = tmp_path / "stack.yaml"
    bad.write_text("polcy:\n  max_model_len: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'polcy'"):
        read_stack_config(bad)
    bad.write_text("policy: 3\n")
    with pytest.raises(ConfigError, match="section 'policy' must be a mapping"):
        read_stack_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_stack_config(tmp_path / "missing.yaml")
    assert read_stack_config(None) == {}


def test_prepare_writes_what_the_plan_needs(tmp_path):
    model = _model(tmp_path)
    config = tmp_path / "stack.yaml"
    config.write_text("gateway:\n  default_max_tokens: 8\n")
    plan = prepare(UpOptions(run_dir=tmp_path / "run", model=model, config=config,
                             overrides={"gateway": {"max_n": 4}}))
    try:
        run_dir = (tmp_path / "run").resolve()
        assert plan.run_dir == run_dir
        for sub in ("logs", "config", "data"):
            assert (run_dir / sub).is_dir()
        assert yaml.safe_load((run_dir / "config" / "gateway.yaml").read_text()) == {
            "default_max_tokens": 8, "max_n": 4}
        assert (run_dir / "prompts.jsonl").exists()
        assert all(s.ipc_dir.is_dir() for s in plan.of_kind("policy"))
        assert _flag_values(plan.of_kind("policy")[0].argv, "--model") == [str(model)]
        token = run_dir / "admin-token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert plan.of_kind("policy")[0].env["RLHF_POLICY_ADMIN_TOKEN"] == token.read_text()
        assert admin_token(run_dir) == token.read_text()  # one token per run dir
        trainer = run_dir / "trainer-token"
        assert stat.S_IMODE(trainer.stat().st_mode) == 0o600
        assert plan.of_kind("trainer")[0].env["RLHF_TRAINER_ADMIN_TOKEN"] == trainer.read_text()
        assert trainer.read_text() != token.read_text()
    finally:
        shutil.rmtree(plan.ipc_root, ignore_errors=True)


def test_prepare_names_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    with pytest.raises(PlanError, match="has no config.json \\(run `rlhf model prepare`\\)"):
        prepare(UpOptions(run_dir=tmp_path / "run"))
    with pytest.raises(PlanError, match="no-such-model") as info:
        prepare(UpOptions(run_dir=tmp_path / "run", model=tmp_path / "no-such-model"))
    assert "rlhf model prepare" not in str(info.value)
    # The policy section's `model` key names the model when --model does not.
    model = _model(tmp_path)
    config = tmp_path / "stack.yaml"
    config.write_text(f"policy:\n  model: {model}\n")
    plan = prepare(UpOptions(run_dir=tmp_path / "run", config=config))
    shutil.rmtree(plan.ipc_root, ignore_errors=True)
    assert _flag_values(plan.of_kind("trainer")[0].argv, "--model") == [str(model)]
